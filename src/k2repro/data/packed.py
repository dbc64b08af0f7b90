"""Packed token shards: the format `k2repro data pack` writes and the trainer reads.

A packed directory holds, per split (`train`, `val`):
- `<split>.bin`: token ids (`manifest["dtype"]`), fixed windows of `seq_len + 1` tokens, EOS
  between documents; read with `np.memmap`, so a sample is one slice, never a parse;
- `<split>.docs.parquet`: `doc_id`, `domain`, `token_start`, `n_tokens` per document, so any
  sample id maps back to its documents and text;
- `manifest.json`: shapes, tokenizer facts, and the sha256 / document / token counts of every
  artefact (the store's `data_manifest` rows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2repro.core.atomic import atomic_dir
from k2repro.core.hashing import sha256_file
from k2repro.errors import BadInputError

FORMAT = "k2repro-packed-v1"
MANIFEST = "manifest.json"
_ROW_KEYS = frozenset({"artifact", "path", "sha256", "n_docs", "n_tokens", "bytes"})


@dataclass
class Doc:
    doc_id: str
    domain: str
    tokens: np.ndarray  # 1-D token ids, without EOS


def write_packed(
    out_dir: str | os.PathLike,
    splits: dict[str, Iterable[Doc]],
    seq_len: int,
    vocab_size: int,
    eos_id: int,
    extra_artifacts: Sequence[dict] = (),
    meta: dict | None = None,
) -> dict:
    """Write a packed directory atomically (temp dir + rename); returns the manifest.

    Documents are concatenated with EOS after each, then cut into windows of seq_len + 1;
    the tail shorter than a window is dropped (its count is in the manifest).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    with atomic_dir(out) as tmp:
        window = seq_len + 1
        manifest: dict = {
            "format": FORMAT, "seq_len": seq_len, "vocab_size": vocab_size, "eos_id": eos_id,
            "dtype": np.dtype(dtype).name, "splits": {}, "artifacts": [], **(meta or {}),
        }
        for split, docs in splits.items():
            ids, domains, starts, lens, chunks = [], [], [], [], []
            pos = 0
            for d in docs:
                toks = np.asarray(d.tokens, dtype=np.int64)
                if toks.size and (toks.min() < 0 or toks.max() >= vocab_size):
                    raise BadInputError(f"pack: document {d.doc_id} has token ids outside [0, {vocab_size})")
                ids.append(d.doc_id)
                domains.append(d.domain)
                starts.append(pos)
                lens.append(int(toks.size))
                chunks.append(toks)
                chunks.append(np.array([eos_id], dtype=np.int64))
                pos += toks.size + 1
            stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
            n_samples = stream.size // window
            arr = stream[: n_samples * window].astype(dtype)
            bin_path = tmp / f"{split}.bin"
            arr.tofile(bin_path)
            table = pa.table({
                "doc_id": pa.array(ids, pa.string()), "domain": pa.array(domains, pa.string()),
                "token_start": pa.array(starts, pa.int64()), "n_tokens": pa.array(lens, pa.int64()),
            })
            docs_path = tmp / f"{split}.docs.parquet"
            pq.write_table(table, docs_path)
            manifest["splits"][split] = {
                "n_samples": int(n_samples), "n_docs": len(ids), "n_tokens": int(n_samples * window),
                "dropped_tail_tokens": int(stream.size - n_samples * window),
            }
            manifest["artifacts"].append({
                "artifact": f"packed/{split}.bin", "path": f"{split}.bin", "sha256": sha256_file(bin_path),
                "n_docs": len(ids), "n_tokens": int(n_samples * window),
            })
            manifest["artifacts"].append({
                "artifact": f"packed/{split}.docs", "path": f"{split}.docs.parquet",
                "sha256": sha256_file(docs_path), "n_docs": len(ids), "n_tokens": int(pos),
            })
        manifest["artifacts"].extend(extra_artifacts)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


class PackedDataset:
    """Read-only view of one split of a packed directory."""

    def __init__(self, directory: str | os.PathLike, split: str = "train") -> None:
        self.dir = Path(directory)
        mpath = self.dir / MANIFEST
        if not mpath.exists():
            raise BadInputError(f"data: no packed data at {mpath} (run `k2repro data pack` or `dvc repro`)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise BadInputError(f"data: {mpath} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        except UnicodeDecodeError:
            raise BadInputError(f"data: {mpath} is corrupt (not UTF-8 text)") from None
        if split not in self.manifest.get("splits", {}):
            raise BadInputError(f"data: split '{split}' not in {mpath}")
        self.split = split
        self.seq_len = int(self.manifest["seq_len"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.eos_id = int(self.manifest["eos_id"])
        self.n_samples = int(self.manifest["splits"][split]["n_samples"])
        bin_path = self.dir / f"{split}.bin"
        dtype = np.dtype(self.manifest["dtype"])
        expected = self.n_samples * (self.seq_len + 1) * dtype.itemsize
        if not bin_path.exists() or bin_path.stat().st_size != expected:
            raise BadInputError(f"data: {bin_path} is missing or has the wrong size (expected {expected} bytes)")
        if self.n_samples == 0:
            self.tokens = np.zeros((0, self.seq_len + 1), dtype=dtype)
        else:
            self.tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(self.n_samples, self.seq_len + 1))
        self._docs = None

    def __len__(self) -> int:
        return self.n_samples

    def get(self, sample_ids: Sequence[int], seq_len: int | None = None) -> np.ndarray:
        """Windows for these sample ids as int64, cut to `seq_len + 1` tokens."""
        n = (seq_len or self.seq_len) + 1
        return np.asarray(self.tokens[np.asarray(sample_ids, dtype=np.int64), :n], dtype=np.int64)

    @property
    def docs(self):  # noqa: ANN201 - a pandas DataFrame, imported lazily
        if self._docs is None:
            import pyarrow.parquet as pq

            self._docs = pq.read_table(self.dir / f"{self.split}.docs.parquet").to_pandas()
        return self._docs

    def docs_of(self, sample_id: int) -> list[str]:
        """Document ids whose tokens fall in this sample's window."""
        w = self.seq_len + 1
        lo, hi = sample_id * w, (sample_id + 1) * w
        starts = self.docs["token_start"].to_numpy()
        ends = starts + self.docs["n_tokens"].to_numpy() + 1
        first = int(np.searchsorted(ends, lo, side="right"))
        last = int(np.searchsorted(starts, hi, side="left"))
        return [str(x) for x in self.docs["doc_id"].iloc[first:last]]

    def artifacts(self) -> list[dict]:
        return list(self.manifest.get("artifacts", []))

    def manifest_rows(self) -> list[dict]:
        """The `data_manifest` rows of a run trained on this folder: each artefact with its
        sha256, paths of this folder's own files made full (relative to where it was read);
        `bytes` and, as JSON in `detail`, what else the manifest says of it (reader, content
        fingerprint, split). When the data stages recorded their lineage, one more row for the
        manifest itself: `detail` holds every stage's parameters and datatrove version, and
        how each ran (executor, workers: execution.json)."""
        rows = []
        for a in self.artifacts():
            here = self.dir / a["path"]
            path = str(here) if not os.path.isabs(a["path"]) and here.exists() else a["path"]
            extra = {k: v for k, v in a.items() if k not in _ROW_KEYS}
            rows.append({"artifact": a["artifact"], "path": path, "sha256": a["sha256"],
                         "n_docs": a.get("n_docs"), "n_tokens": a.get("n_tokens"), "bytes": a.get("bytes"),
                         "detail": json.dumps(extra, sort_keys=True) if extra else None})
        if "lineage" in self.manifest:
            mpath, epath = self.dir / MANIFEST, self.dir / "execution.json"
            execution = json.loads(epath.read_text()).get("stages", []) if epath.exists() else []
            rows.append({"artifact": "packed/manifest", "path": str(mpath), "sha256": sha256_file(mpath),
                         "n_docs": None, "n_tokens": None, "bytes": mpath.stat().st_size,
                         "detail": json.dumps({"lineage": self.manifest["lineage"], "execution": execution},
                                              sort_keys=True)})
        return rows

    def verify(self) -> None:
        """Recompute the sha256 of every artefact in this directory; raise naming the first
        file that changed."""
        for a in self.artifacts():
            p = self.dir / a["path"]
            if not p.exists():
                if Path(a["path"]).parent == Path("."):  # this folder's own output: it must be here
                    raise BadInputError(f"data: artefact {p} is missing (listed in {self.dir / MANIFEST})")
                continue  # artefacts of earlier stages live elsewhere
            if sha256_file(p) != a["sha256"]:
                raise BadInputError(f"data: artefact {p} changed (sha256 differs from {self.dir / MANIFEST})")
