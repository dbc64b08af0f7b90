"""Diff two runs: where and why they part.

Config (hyperparameters added, removed, changed), environment (hardware, software, packages,
code, variables), data manifest, run facts, and the curves aligned by step: the first step
whose `batch_hash` differs (other data), the first whose loss differs bit for bit and beyond a
tolerance, with max and mean absolute differences. Facts that every launch changes are set
aside (VOLATILE_*; docs/reproducibility.md lists them), so two identical reruns show no
difference. No torch: this answers in about a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from k2repro.tools.compare import as_float, bit_equal, first_step, last_per_step, within

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.audit.store import Store

#: hyperparameters that say where a run wrote, not what it computed
VOLATILE_HPARAMS = ("audit.store", "ckpt.dir")
#: `runs` columns that every launch changes (or that are compared elsewhere: argv holds the
#: overrides, which the config diff shows key by key)
VOLATILE_RUN = ("run_id", "started_at", "ended_at", "last_heartbeat", "pid", "host", "store_path", "argv",
                "config_json", "error")
RUN_FACTS = ("name", "status", "source", "parent_run_id", "resumed_from_step", "world_size", "config_hash",
             "git_commit", "git_dirty", "launcher", "schema_version", "k2repro_version")
#: `env` facts that every launch changes: process ids, ports, the launcher's run ids and temp
#: files, and the host name (hardware is compared through cpu.*, ram.*, gpu.*)
VOLATILE_ENV = ("pid", "host", "rank", "env.MASTER_PORT", "env.TORCHELASTIC_RUN_ID", "env.TORCHELASTIC_ERROR_FILE",
                "env.K2REPRO_RUN_ID", "env.K2REPRO_EXIT_FILE", "env.K2REPRO_STOP_FILE", "env.K2REPRO_PARAMS_FILE",
                "env.K2REPRO_PARENT_RUN_ID", "env.K2REPRO_SOURCE", "env.K2REPRO_STORE")
#: data manifest fields compared per artefact (its path is where the files lay, set aside)
DATA_FIELDS = ("sha256", "n_docs", "n_tokens", "bytes")
ENV_GROUPS = (
    ("hardware", ("cpu.", "ram.", "gpu.")),
    ("packages", ("pkg.",)),
    ("code", ("git.",)),
    ("params files", ("dvc.",)),  # params.yaml/dvc.lock as DVC rewrote them: not code
    ("variables", ("env.",)),
    ("software", ("",)),
)
DEFAULT_TOLERANCE = 1e-5


def set_aside() -> dict[str, list[str]]:
    """What the diff ignores, by section (the docs list the same)."""
    return {"hparams": list(VOLATILE_HPARAMS), "runs": list(VOLATILE_RUN), "env": list(VOLATILE_ENV),
            "data_manifest": ["path"],
            "steps": ["step_time_s", "tokens_per_s", "time", "mfu", "peak_mem_bytes"]}


def dict_diff(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, dict]:
    """{'added': {k: b}, 'removed': {k: a}, 'changed': {k: [a, b]}} of B against A."""
    ka = {k for k in a if k not in ignore}
    kb = {k for k in b if k not in ignore}
    return {
        "added": {k: b[k] for k in sorted(kb - ka)},
        "removed": {k: a[k] for k in sorted(ka - kb)},
        "changed": {k: [a[k], b[k]] for k in sorted(ka & kb) if not _same(a[k], b[k])},
    }


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return bool(bit_equal(np.array([x]), np.array([y]))[0])
    return x == y


def _empty(d: dict[str, dict]) -> bool:
    return not any(d.values())


def _group(key: str) -> str:
    for name, prefixes in ENV_GROUPS:
        if any(key.startswith(p) for p in prefixes):
            return name
    return "software"


def env_diff(a: dict[str, str], b: dict[str, str]) -> dict[str, dict]:
    """The env facts of rank 0, grouped: hardware, software, packages, code, variables."""
    full = dict_diff(a, b, VOLATILE_ENV)
    out: dict[str, dict] = {g: {"added": {}, "removed": {}, "changed": {}} for g, _ in ENV_GROUPS}
    for kind, items in full.items():
        for k, v in items.items():
            out[_group(k)][kind][k] = v
    return out


def data_diff(a_rows: list[dict], b_rows: list[dict]) -> dict[str, Any]:
    """Data artefacts by name: added, removed, and per artefact the fields that changed."""
    a = {r["artifact"]: r for r in a_rows}
    b = {r["artifact"]: r for r in b_rows}
    changed = {}
    for k in sorted(a.keys() & b.keys()):
        d = {f: [a[k].get(f), b[k].get(f)] for f in DATA_FIELDS
             if a[k].get(f) is not None and b[k].get(f) is not None and a[k].get(f) != b[k].get(f)}
        if d:
            changed[k] = d
    return {"added": sorted(b.keys() - a.keys()), "removed": sorted(a.keys() - b.keys()), "changed": changed}


def curves(a: Any, b: Any, tolerance: float) -> dict[str, Any]:
    """Steps aligned: first divergences of batch_hash, loss (bitwise, beyond tolerance) and
    grad_norm, with max/mean absolute loss difference over the common steps."""
    a = last_per_step(a)
    b = last_per_step(b)
    m = a.merge(b, on="step", suffixes=("_a", "_b")).sort_values("step")
    steps = m["step"].to_numpy()
    out: dict[str, Any] = {
        "steps_a": len(a), "steps_b": len(b), "steps_common": len(m),
        "first_common_step": int(steps[0]) if len(steps) else None,
        "last_common_step": int(steps[-1]) if len(steps) else None,
        "only_in_a": len(a) - len(m), "only_in_b": len(b) - len(m), "tolerance": tolerance,
    }
    ha, hb = m["batch_hash_a"], m["batch_hash_b"]
    both = (ha.notna() & hb.notna()).to_numpy()
    out["batch_hash_compared"] = int(both.sum())
    out["first_batch_divergence_step"] = first_step(steps, both & (ha != hb).to_numpy())
    for name in ("loss", "grad_norm"):
        va, vb = as_float(m[f"{name}_a"]), as_float(m[f"{name}_b"])
        have = ~(np.isnan(va) & np.isnan(vb))
        out[f"{name}_compared"] = int(have.sum())
        out[f"first_{name}_divergence_step"] = first_step(steps, have & ~bit_equal(va, vb))
        out[f"first_{name}_divergence_step_tol"] = first_step(steps, have & ~within(va, vb, tolerance))
        fin = have & np.isfinite(va) & np.isfinite(vb)
        d = np.abs(va[fin] - vb[fin])
        out[f"{name}_max_abs_diff"] = float(d.max()) if d.size else None
        out[f"{name}_mean_abs_diff"] = float(d.mean()) if d.size else None
    return out


def _data_rows(store: Store, run_id: str) -> list[dict]:
    cur = store.execute("SELECT * FROM data_manifest WHERE run_id = ? ORDER BY artifact", [run_id])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def _steps(store: Store, run_id: str) -> Any:
    return store.sql("SELECT step, loss, grad_norm, batch_hash FROM steps WHERE run_id = ? ORDER BY step", [run_id])


def diff_runs(store_a: Store, ref_a: str, store_b: Store, ref_b: str,
              tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """The whole diff of run B against run A, as plain data (`--json`'s object)."""
    ra, rb = store_a.resolve_run_id(ref_a), store_b.resolve_run_id(ref_b)
    run_a, run_b = store_a.run(ra), store_b.run(rb)
    ha, hb = store_a.hparams(ra), store_b.hparams(rb)
    ea, eb = store_a.env(ra, 0), store_b.env(rb, 0)
    da, db = _data_rows(store_a, ra), _data_rows(store_b, rb)
    sa, sb = _steps(store_a, ra), _steps(store_b, rb)
    cannot: list[str] = []
    label = {"A": f"run A ({run_a.get('source') or 'train'})", "B": f"run B ({run_b.get('source') or 'train'})"}
    for what, x, y in (("config (hyperparameters)", ha, hb), ("environment", ea, eb), ("data manifest", da, db)):
        for side, v in (("A", x), ("B", y)):
            if not v:
                cannot.append(f"{what}: {label[side]} records none")
    for col in ("batch_hash", "loss", "grad_norm"):
        for side, s in (("A", sa), ("B", sb)):
            if len(s) and s[col].isna().all():
                cannot.append(f"{col}: {label[side]} records none")
    if not len(sa) or not len(sb):
        cannot.append("curves: " + " and ".join(label[k] for k, s in (("A", sa), ("B", sb)) if not len(s))
                      + " records no steps")

    config = dict_diff(ha, hb, VOLATILE_HPARAMS) if ha and hb else {"added": {}, "removed": {}, "changed": {}}
    env = env_diff(ea, eb) if ea and eb else {g: {"added": {}, "removed": {}, "changed": {}} for g, _ in ENV_GROUPS}
    data = data_diff(da, db) if da and db else {"added": [], "removed": [], "changed": {}}
    facts = dict_diff({k: run_a.get(k) for k in RUN_FACTS}, {k: run_b.get(k) for k in RUN_FACTS})["changed"]
    cur = curves(sa, sb, tolerance)
    differs = bool(
        not _empty(config) or any(not _empty(v) for v in env.values())
        or data["added"] or data["removed"] or data["changed"] or facts
        or cur["first_batch_divergence_step"] is not None or cur["first_loss_divergence_step"] is not None
        or cur["first_grad_norm_divergence_step"] is not None or cur["only_in_a"] or cur["only_in_b"])
    return {
        "run_a": ra, "run_b": rb, "store_a": str(store_a.root), "store_b": str(store_b.root),
        "identical": not differs,
        "config": config, "env": env, "data": data, "run": facts, "curves": cur,
        "first_batch_divergence_step": cur["first_batch_divergence_step"],
        "first_loss_divergence_step": cur["first_loss_divergence_step"],
        "first_loss_divergence_step_tol": cur["first_loss_divergence_step_tol"],
        "cannot_compare": cannot, "set_aside": set_aside(),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    s = str(v)
    return s if len(s) <= 60 else s[:59] + "…"


def _step(v: Any, compared: int | None = None) -> str:
    """A divergence step; "none" only when some common step was compared (0 compared means
    the column cannot be compared: saying "none" would claim the runs agree)."""
    if v is None and compared == 0:
        return "not compared (see cannot compare)"
    return "none" if v is None else str(v)


def _changes(d: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """(kind, key, A, B) rows of a dict_diff."""
    rows = [("changed", k, _fmt(a), _fmt(b)) for k, (a, b) in d["changed"].items()]
    rows += [("added", k, "", _fmt(v)) for k, v in d["added"].items()]
    rows += [("removed", k, _fmt(v), "") for k, v in d["removed"].items()]
    return rows


def _sections(r: dict) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    out = [("config", _changes(r["config"]))]
    out.append(("run", [("changed", k, _fmt(a), _fmt(b)) for k, (a, b) in r["run"].items()]))
    for g, _ in ENV_GROUPS:
        out.append((f"env/{g}", _changes(r["env"][g])))
    d = r["data"]
    rows = [("changed", f"{k}.{f}", _fmt(a), _fmt(b)) for k, fs in d["changed"].items() for f, (a, b) in fs.items()]
    rows += [("added", k, "", "") for k in d["added"]] + [("removed", k, "", "") for k in d["removed"]]
    out.append(("data", rows))
    return out


def _curve_lines(r: dict) -> list[str]:
    c = r["curves"]
    lines = [
        f"steps: A {c['steps_a']}, B {c['steps_b']}, common {c['steps_common']}"
        + (f" ({c['first_common_step']}..{c['last_common_step']})" if c["steps_common"] else ""),
        f"first batch_hash divergence: {_step(c['first_batch_divergence_step'], c['batch_hash_compared'])}",
        f"first loss divergence (bitwise): {_step(c['first_loss_divergence_step'], c['loss_compared'])}",
        f"first loss divergence (beyond {c['tolerance']:g} relative): "
        f"{_step(c['first_loss_divergence_step_tol'], c['loss_compared'])}",
        f"first grad_norm divergence (bitwise): "
        f"{_step(c['first_grad_norm_divergence_step'], c['grad_norm_compared'])}",
    ]
    if c["loss_max_abs_diff"] is not None:
        lines.append(f"loss |A-B|: max {c['loss_max_abs_diff']:.6g}, mean {c['loss_mean_abs_diff']:.6g}")
    return lines


def render_text(r: dict) -> str:
    out = [f"diff {r['run_a']} (A) -> {r['run_b']} (B): {'no differences' if r['identical'] else 'they differ'}"]
    for name, rows in _sections(r):
        if not rows:
            continue
        out.append(f"\n{name}:")
        w = max(len(k) for _, k, _, _ in rows)
        for kind, k, a, b in rows:
            sym = {"changed": "~", "added": "+", "removed": "-"}[kind]
            out.append(f"  {sym} {k.ljust(w)}  {a} -> {b}" if kind == "changed" else f"  {sym} {k.ljust(w)}  {a or b}")
    out.append("\ncurves:")
    out += [f"  {ln}" for ln in _curve_lines(r)]
    if r["cannot_compare"]:
        out.append("\ncannot compare:")
        out += [f"  {x}" for x in r["cannot_compare"]]
    out.append("\nset aside (change with every launch): " + ", ".join(
        f"{t}.{k}" for t, ks in r["set_aside"].items() for k in ks if t in ("hparams", "runs")) + ", env pid/host/ports, "
        "data paths, step timings")
    return "\n".join(out)


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def render_md(r: dict) -> str:
    out = [f"# Diff: `{r['run_a']}` (A) vs `{r['run_b']}` (B)", "",
           "**No differences** once volatile facts are set aside." if r["identical"] else "**The runs differ.**", ""]
    for name, rows in _sections(r):
        out.append(f"## {name}")
        out.append("")
        if not rows:
            out += ["No differences.", ""]
            continue
        out += ["| | key | A | B |", "|---|---|---|---|"]
        for kind, k, a, b in rows:
            out.append(f"| {kind} | `{k}` | {_cell(a)} | {_cell(b)} |")
        out.append("")
    out += ["## curves", ""] + [f"- {ln}" for ln in _curve_lines(r)] + [""]
    if r["cannot_compare"]:
        out += ["## cannot compare", ""] + [f"- {x}" for x in r["cannot_compare"]] + [""]
    out += ["## set aside", ""] + [f"- `{t}`: " + ", ".join(f"`{k}`" for k in ks) for t, ks in r["set_aside"].items()]
    return "\n".join(out) + "\n"


def plot_png(store_a: Store, store_b: Store, r: dict, path: str | Path) -> Path:
    """Both loss curves and their difference (B - A) on the common steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sa, sb = last_per_step(_steps(store_a, r["run_a"])), last_per_step(_steps(store_b, r["run_b"]))
    m = sa.merge(sb, on="step", suffixes=("_a", "_b")).sort_values("step")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    ax1.plot(sa["step"], as_float(sa["loss"]), label=f"A {r['run_a']}", lw=1.2)
    ax1.plot(sb["step"], as_float(sb["loss"]), label=f"B {r['run_b']}", lw=1.2, ls="--")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=7)
    ax2.plot(m["step"], as_float(m["loss_b"]) - as_float(m["loss_a"]), color="C3", lw=1)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set_ylabel("loss B - A")
    ax2.set_xlabel("step")
    for key, color in (("first_batch_divergence_step", "C2"), ("first_loss_divergence_step", "C3")):
        if r[key] is not None:
            for ax in (ax1, ax2):
                ax.axvline(r[key], color=color, lw=0.8, ls=":")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
