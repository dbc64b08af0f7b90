"""What a person reads first in a bundle: README.md, the model card (what was trained, how, on
what, with which results, and how to check, import and replay it), and `figures/loss.png`.
Generated from bundle.json's content and the run's config and environment only, so the page
never says more than the machine-readable record."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

#: Sources whose runs k2repro's own trainer made (packed data, DCP checkpoints, batch hashes).
K2_SOURCES = ("train", "replay")
#: At most this many config keys of a run k2repro did not train are listed on the card.
MAX_CARD_KEYS = 40


def foreign_sources(chain: list[dict[str, Any]]) -> list[str]:
    """The `source` of every launch k2repro did not train itself (audit API, the Transformers
    or Lightning callback, an importer): such a run has no k2repro packed data and no DCP
    checkpoints with a k2repro manifest, so neither can ship."""
    return sorted({str(r.get("source")) for r in chain if (r.get("source") or "train") not in K2_SOURCES})


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix: cfg} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in sorted(cfg.items(), key=lambda kv: str(kv[0])):
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def _short(v: Any, n: int = 80) -> str:
    text = str(v).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def _sections(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    return tuple(x if isinstance(x, dict) else {} for x in (cfg.get("model"), cfg.get("train"), cfg.get("optim")))


def _title(info: dict[str, Any]) -> list[str]:
    run, chain = info["run"], info["run"]["chain"]
    return [f"# {run['name'] or run['head']}: k2repro release bundle", "",
            f"Run `{run['head']}`"
            + (f", one logical run of {len(chain)} launches ({' -> '.join(r['run_id'] for r in chain)})"
               if len(chain) > 1 else "")
            + f". Exported {info['created_at'][:19]} UTC by k2repro {info['k2repro_version']} "
              f"(audit schema version {info['schema_version']}). Everything in this folder is listed with "
              f"its sha256 in `MANIFEST.json`; `bundle.json` is the machine-readable form of this page.",
            "", "## What", ""]


def _trained_here(info: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The model and the training of a run k2repro trained, from its config."""
    steps, head = info["steps"], info["run"]["chain"][-1]
    m, t, _ = _sections(cfg)
    n_params = next((c["n_params"] for c in info["checkpoints"]), None)
    tokens = (steps["count"] or 0) * int(t.get("global_batch_size") or 0) * int(t.get("seq_len") or 0)
    return [
        f"- Model: decoder-only transformer (RMSNorm, RoPE, SwiGLU), {m.get('n_layers')} layers, d_model "
        f"{m.get('d_model')}, {m.get('n_heads')} heads ({m.get('n_kv_heads')} KV heads), FFN "
        f"{m.get('ffn_dim')}, vocab {m.get('vocab_size')}" + (f", {n_params:,} parameters" if n_params else "")
        + ".",
        f"- Trained {steps['count']} steps ({steps['first']}..{steps['last']}) of {t.get('global_batch_size')} "
        f"sequences x {t.get('seq_len')} tokens ({tokens:,} tokens) at world size {head.get('world_size')}, "
        f"precision {t.get('precision')}, deterministic={t.get('deterministic')}, seed {t.get('seed')}."]


def _recorded_elsewhere(info: dict[str, Any], cfg: dict[str, Any], foreign: list[str]) -> list[str]:
    """A run k2repro logged but did not train: only what it recorded (its config, verbatim)."""
    steps, head = info["steps"], info["run"]["chain"][-1]
    flat = _flat(cfg)
    shown = [(k, v) for k, v in flat.items() if v not in (None, "", [], {})][:MAX_CARD_KEYS]
    lines = [
        f"- Recorded through {', '.join(sorted(set(foreign)))} (k2repro logged the run; it did not train it, "
        f"so the model and optimizer are whatever that code built: see its config below and in `config.yaml`).",
        f"- {steps['count']} logged steps"
        + (f" ({steps['first']}..{steps['last']})" if steps["count"] else "")
        + f" at world size {head.get('world_size')}."]
    if shown:
        lines += ["", f"Recorded config ({len(shown)} of {len(flat)} keys; all in `config.yaml`):", "",
                  _md_table(["key", "value"], [[f"`{k}`", _short(v)] for k, v in shown]), ""]
    return lines


def _results(info: dict[str, Any], e0: dict[str, str], git_dirty: bool | None, evals: pa.Table | None) -> list[str]:
    """Final loss, config hash and code (dirty or not), an incomplete run, the evaluations."""
    steps, head = info["steps"], info["run"]["chain"][-1]
    lines = [
        f"- Final training loss: {steps['final_loss']!r}." if steps["final_loss"] is not None else "- No steps.",
        f"- Config hash `{head.get('config_hash')}`; code `{e0.get('git.commit', 'unknown')}`"
        + (" (with uncommitted changes)" if git_dirty else "") + ".", ""]
    if info.get("incomplete"):
        lines += ["**Incomplete run** (exported with `--allow-incomplete`):", ""]
        lines += [f"- {p}" for p in info["incomplete"]] + [""]
    if evals is not None and evals.num_rows:
        d = evals.select(["step", "metric", "value"]).to_pylist()
        last = max(r["step"] for r in d)
        lines += [f"Evaluations of the checkpoint of step {last} (all steps: `logical/evals.parquet`):", "",
                  _md_table(["metric", "value"], [[r["metric"], f"{r['value']:.6g}"] for r in d
                                                  if r["step"] == last and r["value"] is not None]), ""]
    return lines


def _how(info: dict[str, Any], cfg: dict[str, Any], e0: dict[str, str], foreign: list[str]) -> list[str]:
    """Optimizer, config, environment, data and data order."""
    chain, data = info["run"]["chain"], info["data"]
    _, _, o = _sections(cfg)
    lines = ["## How", ""]
    if not foreign:
        lines += [f"- Optimizer: AdamW, lr {o.get('lr')} (warmup {o.get('warmup_steps')} steps, then cosine to "
                  f"{o.get('min_lr')}), weight decay {o.get('weight_decay')}, gradient clipping "
                  f"{o.get('clip_grad')}."]
    lines += ["- The resolved config is `config.yaml`" + (" (the first launch's; every launch's in `configs/`)"
                                                          if len(chain) > 1 else "") + ".",
              f"- Environment (rank 0): torch {e0.get('torch.version', '?')}, python {e0.get('python', '?')}, "
              f"CPU {e0.get('cpu.model', '?')}"
              + (f", {e0.get('gpu.count')} x {e0['gpu.name']} (driver {e0.get('gpu.driver')}, CUDA "
                 f"{e0.get('torch.cuda')})" if e0.get("gpu.name") not in (None, "", "absent") else ", no GPU")
              + "; every rank's facts in `env.json`.",
              ""]
    if data.get("shipped"):
        lines += [f"- Data: the packed training data ships in `data/packed/` ({data['n_samples']} samples, "
                  f"{data['bytes'] / 1e6:.2f} MB), checked against the sha256 the run recorded:", "",
                  _md_table(["artefact", "file", "sha256"],
                            [[a["artifact"], f"`{a['bundle_path']}`", f"`{a['sha256'][:16]}…`"]
                             for a in data["artifacts"]]), ""]
    else:
        lines += ["- Data: not shipped" + (" (k2repro did not pack it)" if foreign else " (exported with `--no-data`)")
                  + "; `tables/*/data_manifest` names what the run recorded.", ""]
    do = info["data_order"]
    if do.get("file"):
        lines += [f"- Data order: `{do['file']}` holds the sample ids of every step in batch order "
                  f"({do['source']}" + (f", checked against the recorded batch hash of {do['batch_hash_checked']} "
                                         f"steps" if do.get("batch_hash_checked") else "") + ").", ""]
    return lines


def _checkpoints(info: dict[str, Any]) -> list[str]:
    """The figure, the exported checkpoints and the lineage table."""
    chain = info["run"]["chain"]
    lines = ["## Figures", "", "![loss and gradient norm](figures/loss.png)", ""] if info["figures"] else []
    lines += ["## Checkpoints", ""]
    if info["checkpoints"]:
        lines += [_md_table(["step", "run", "weights (safetensors)", "sha256", "replay state (DCP)"],
                            [[c["step"], f"`{c['run_id']}`", f"`{c['safetensors']}`",
                              f"`{c['safetensors_sha256'][:16]}…`", f"`{c['dcp']}`"] for c in info["checkpoints"]]),
                  ""]
    else:
        lines += ["None exported (`--checkpoints none`, or none left).", ""]
    if len(chain) > 1:
        lines += ["## Lineage", "", "A later launch's steps replace its parent's after the step it resumed from.", "",
                  _md_table(["run", "source", "parent", "resumed from step", "steps kept up to"],
                            [[f"`{r['run_id']}`", r.get("source"), r.get("parent_run_id"), r.get("resumed_from_step"),
                              r.get("cut") if r.get("cut") is not None else "end"] for r in chain]), ""]
    return lines


def _files_and_use(info: dict[str, Any]) -> list[str]:
    """What each file is, how to check, import and replay the bundle, and the notes."""
    lines = ["## Files", "", _md_table(["path", "what"], [
        ["`README.md`", "this page"], ["`bundle.json`", "what this page says, as JSON"],
        ["`MANIFEST.json`", "sha256 and size of every file (and of itself)"],
        ["`config.yaml`", "the resolved config"], ["`env.json`", "hardware and software facts per run and rank"],
        ["`tables/<run_id>/<table>/*.parquet`", "the run's audit tables (a store: `k2repro sql --store tables`)"],
        ["`logical/<table>.parquet`", "steps, checkpoints, evals, ... stitched along the lineage"],
        ["`k2repro.duckdb`", "DuckDB views over the tables (open it from this folder)"],
        ["`data/packed/`, `data/order.parquet`", "the training data and the sample ids of every step"],
        ["`weights/step_*.safetensors`", "model weights of each exported checkpoint"],
        ["`dcp/<run_id>/step_*/`", "the same checkpoints with optimizer and RNG state, for replay"],
        ["`figures/`, `forensics/`", "the loss figure; the forensics report where one was made"]]), "",
        "## Check it, import it, replay it", "", "```",
        "k2repro verify-bundle .                      # every sha256; exit 1 names a changed file",
        "k2repro import bundle . --store runs         # verifies, then adds the run(s) to a store",
        f"k2repro replay {info['run']['head']} --from-step A --to-step B --store runs   # bit-exact on the same "
        f"hardware and software", "```", "",
        "Replay re-runs steps from the shipped DCP checkpoints and data; bit-exactness needs the same world "
        "size, hardware, software and the deterministic flag (docs/reproducibility.md).", ""]
    notes = ([info["what_ships"]] if info.get("what_ships") else []) + info["notes"]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return lines


def render_model_card(info: dict[str, Any], cfg: dict[str, Any], env: dict[str, dict[str, str]],
                      evals: pa.Table | None, git_dirty: bool | None = None) -> str:
    """README.md: what was trained, how, on what, with which results, and how to check it.

    `info` is bundle.json's content, `cfg` and `env` the first launch's config and facts by
    rank, `git_dirty` its `runs.git_dirty` (the stored boolean, not the env text: the card once
    missed every dirty run by testing the text for "True" while facts write "true")."""
    e0 = env.get("0", {})
    foreign = foreign_sources(info["run"]["chain"])
    what = _trained_here(info, cfg) if not foreign else _recorded_elsewhere(info, cfg, foreign)
    lines = (_title(info) + what + _results(info, e0, git_dirty, evals) + _how(info, cfg, e0, foreign)
             + _checkpoints(info) + _files_and_use(info))
    return "\n".join(lines)


def loss_figure(steps: pa.Table | None, chain: list[dict[str, Any]], ckpts: list[dict[str, Any]],
                evals: pa.Table | None, out: Path) -> bool:
    """figures/loss.png: loss and grad norm over the logical run, resume points and exported
    checkpoints marked."""
    if steps is None or steps.num_rows == 0:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = steps.select(["step", "loss", "grad_norm"]).to_pydict()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, constrained_layout=True)
    a1.plot(d["step"], d["loss"], lw=1.2, label="train loss")
    if evals is not None and evals.num_rows:
        e = [(s, v) for s, m, v in zip(*evals.select(["step", "metric", "value"]).to_pydict().values())
             if m == "val/loss" and v is not None]
        if e:
            a1.plot([s for s, _ in e], [v for _, v in e], "o-", ms=4, lw=1, label="val/loss")
    a2.plot(d["step"], d["grad_norm"], lw=1, color="tab:orange", label="grad norm")
    for r in chain[1:]:
        if r["resumed_from_step"] is not None:
            for a in (a1, a2):
                a.axvline(r["resumed_from_step"], color="grey", ls="--", lw=0.8)
    for c in ckpts:
        a1.axvline(c["step"], color="tab:green", ls=":", lw=0.8)
    a1.set_ylabel("loss")
    a2.set_ylabel("grad norm")
    a2.set_xlabel("step")
    a1.legend(loc="upper right", fontsize=8)
    a1.set_title(f"{chain[-1]['name'] or chain[-1]['run_id']}: dotted = exported checkpoints, dashed = resumes")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


__all__ = ["render_model_card", "loss_figure", "foreign_sources", "K2_SOURCES", "MAX_CARD_KEYS"]
