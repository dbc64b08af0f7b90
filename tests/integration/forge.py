"""Forging kit for bundles (issue 24): what an attacker does to a real exported bundle, shared by
tests/integration/test_bundle_untrusted.py and the fault campaign's `forged` section
(scripts/fault_campaign.py), so both refuse the very same forgeries.

Every forgery starts as a hard-linked copy of a real bundle (`forge`); changed files are
replaced (`put`, `put_table`, `edit_json`), never edited in place, so the original bundle stays
intact; then MANIFEST.json is recomputed with k2repro's own code (`reseal`): a checksum proves
integrity, not origin, so each forgery still "verifies" by checksum and must be refused for
what it says. The `forge_*` builders make the forgeries of the issue's findings 1-4 and 8."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

#: A chain id that walks out of the store when used as a path (finding 2).
EVIL_ID = "x/../../../escaped"


def forge(src: Path, dst: Path) -> Path:
    """A copy of bundle `src` at `dst` whose files are hard links (cheap, and `put` replaces)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def put(path: Path, data: bytes | str) -> None:
    """Replace a (hard-linked) file without touching the original."""
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def put_table(path: Path, tbl: pa.Table) -> None:
    """Replace (or add) a Parquet segment without touching the original."""
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(tbl, path)


def edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    """Rewrite a JSON file through `fn` (which edits in place or returns the new body)."""
    body = json.loads(path.read_text())
    body = fn(body) or body
    put(path, json.dumps(body))


def reseal(b: Path) -> None:
    """What an attacker does: recompute MANIFEST.json with k2repro's own code."""
    from k2repro.bundle.manifest import MANIFEST_JSON, write_manifest

    body = json.loads((b / MANIFEST_JSON).read_text())
    (b / MANIFEST_JSON).unlink()
    write_manifest(b, {k: body[k] for k in ("created_at", "run", "runs")})


def nothing_imported(store: Path) -> bool:
    """No imported run folder and no import's temporary folder in `store`."""
    return not store.exists() or not any(p.name.startswith(("bundle-", ".k2imp")) for p in store.iterdir())


# ----------------------------------------------------------------------------- the forgeries

def forge_victim_runs_row(bundle: Path, dst: Path, rid: str, outside: Path) -> Path:
    """Finding 1: a second `runs` segment naming `victim_project`, with `ckpt.dir` outside the
    store and an old `started_at` (so that `gc --older-than` would pick it)."""
    from k2repro.audit.schema import arrow_schema

    b = forge(bundle, dst)
    seg = next((b / "tables" / rid / "runs").glob("*.parquet"))
    row = pq.read_table(seg).to_pylist()[0]
    old = datetime.now(timezone.utc) - timedelta(days=90)
    row.update(run_id="victim_project", started_at=old, config_json=json.dumps({"ckpt": {"dir": str(outside)}}))
    put_table(seg.with_name("r9-00000000.parquet"), pa.Table.from_pylist([row], schema=arrow_schema("runs")))
    reseal(b)
    return b


def forge_walk_out(bundle: Path, dst: Path, where: str) -> Path:
    """Finding 2: a chain id (`where="chain"`) or a checkpoint's run id (`"checkpoint"`) that
    walks out of the store."""
    b = forge(bundle, dst)

    def bad(info: dict) -> None:
        if where == "chain":
            info["run"]["chain"][0]["run_id"] = EVIL_ID
            info["run"]["head"] = EVIL_ID
        else:
            info["checkpoints"][0]["run_id"] = EVIL_ID
    edit_json(b / "bundle.json", bad)
    reseal(b)
    return b


def forge_absolute_dcp(bundle: Path, dst: Path, elsewhere: Path) -> Path:
    """Finding 3: a checkpoint entry whose `dcp` is an absolute path outside the bundle."""
    b = forge(bundle, dst)
    edit_json(b / "bundle.json", lambda i: i["checkpoints"][0].update(dcp=str(elsewhere)))
    reseal(b)
    return b


def forge_symlinked_data(bundle: Path, dst: Path, elsewhere: Path) -> Path:
    """Finding 3: `data/packed` is a symbolic link to a folder outside the bundle (a copy of the
    real one made at `elsewhere`, so every checksum agrees)."""
    b = forge(bundle, dst)
    forge(b / "data" / "packed", elsewhere)
    shutil.rmtree(b / "data" / "packed")
    os.symlink(elsewhere, b / "data" / "packed")
    return b


def forge_takeover(bundle: Path, dst: Path, rid: str, new_id: str = "forged-1") -> Path:
    """Finding 4: a bundle whose chain id is new (`new_id`) but whose steps rows still carry
    `rid`, the id of a run already in the store."""
    b = forge(bundle, dst)
    os.rename(b / "tables" / rid, b / "tables" / new_id)
    seg = next((b / "tables" / new_id / "runs").glob("*.parquet"))
    t = pq.read_table(seg)
    put_table(seg, t.set_column(t.schema.get_field_index("run_id"), "run_id", pa.array([new_id] * t.num_rows)))
    edit_json(b / "tables" / new_id / "_run.json", lambda m: m.update(run_id=new_id))

    def retarget(info: dict) -> None:
        info["run"]["chain"][0]["run_id"] = info["run"]["head"] = info["run"]["root"] = new_id
        info["checkpoints"] = []
    edit_json(b / "bundle.json", retarget)
    shutil.rmtree(b / "dcp")
    reseal(b)
    return b


def make_keys(folder: Path) -> tuple[Path, Path, Path]:
    """Two ed25519 key pairs: (my private key, my public key, someone else's public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    paths = []
    for name in ("mine", "theirs"):
        k = Ed25519PrivateKey.generate()
        priv, pub = folder / f"{name}.pem", folder / f"{name}.pub"
        priv.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                    serialization.PublicFormat.OpenSSH))
        paths += [priv, pub]
    return paths[0], paths[1], paths[3]


def forge_after_signing(signed: Path, dst: Path) -> Path:
    """Finding 8: a signed bundle changed and resealed: the checksums agree, the signature
    (MANIFEST.sig, still the signer's) does not."""
    b = forge(signed, dst)
    put(b / "config.yaml", "train: {lr: 1000}\n")
    reseal(b)
    return b
