"""Compose `conf/` with Hydra, merge onto the typed schema once, validate.

This is the one module that touches Hydra/OmegaConf. Everything downstream gets a `RunConfig`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from k2repro.config.schema import (
    BACKENDS,
    BAD_BATCH_KINDS,
    GUARD_ACTIONS,
    KILL_PHASES,
    PRECISIONS,
    RunConfig,
)
from k2repro.core.hashing import canonical_hash
from k2repro.errors import ConfigError

_REGISTERED = False


def register_schema() -> None:
    """Register the typed schema with Hydra's ConfigStore (as `k2repro_schema`).

    The YAML in `conf/` does not reference it (DVC must compose `conf/` without our code);
    users can still use it as a base in their own Hydra apps.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="k2repro_schema", node=RunConfig)
    _REGISTERED = True


def conf_dir() -> Path:
    """`$K2REPRO_CONF`, else `./conf`, else the `conf/` of the source checkout."""
    env = os.environ.get("K2REPRO_CONF")
    if env:
        return Path(env).resolve()
    here = Path.cwd() / "conf"
    if (here / "config.yaml").exists():
        return here.resolve()
    repo = Path(__file__).resolve().parents[3] / "conf"
    return repo


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _schema_hint(dotted: str) -> str:
    """Where a dotted key leaves the schema, the keys that exist there and the closest ones,
    e.g. "'data' has no key 'txt_field' (did you mean data.text_field?; keys of data: ...)"."""
    import dataclasses
    import difflib

    node: Any = RunConfig()
    done: list[str] = []
    for part in dotted.lstrip("+~").split("."):
        if not dataclasses.is_dataclass(node):
            return ""
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            where = ".".join(done)
            close = difflib.get_close_matches(part, names, n=2, cutoff=0.6)
            mean = f"did you mean {' or '.join((where + '.' if where else '') + c for c in close)}?; " if close else ""
            return (f"{repr(where) if where else 'the config'} has no key '{part}' "
                    f"({mean}keys of {where or 'the config'}: {', '.join(names)})")
        done.append(part)
        node = getattr(node, part)
    return ""


_OPTIONS = re.compile(r"Available options in '([^']+)':\s*\n((?:[ \t]+\S[^\n]*\n?)+)")
_MISSING = re.compile(r"Could not find '([^']+)/([^'/]+)'")
_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def hydra_message(exc: BaseException) -> str:
    """Hydra's whole message on one line, with what it leaves out: the options of a config
    group ("model=tinyy": 1b, k2_65b, small, tiny; did you mean tiny?) and, for a key that does
    not exist, the keys that do. Its 'Config search path' tail (paths of this machine) is dropped."""
    import difflib

    text = str(exc).split("Config search path:")[0]
    options: list[str] = []
    m = _OPTIONS.search(text)
    if m:
        options = [ln.strip() for ln in m.group(2).splitlines() if ln.strip()]
        text = text[: m.start()] + f"available options in '{m.group(1)}': {', '.join(options)}" + text[m.end():]
    miss = _MISSING.search(text)
    if miss and options:
        close = difflib.get_close_matches(miss.group(2), options, n=1, cutoff=0.6)
        if close:
            text += f" (did you mean {miss.group(1)}={close[0]}?)"
    over = _OVERRIDE.search(text)
    if over:
        hint = _schema_hint(over.group(1))
        if not hint and exc.__cause__ is not None:
            hint = _first_line(exc.__cause__)
        if hint:
            text = text[: over.end()] + f": {hint}" + text[over.end():]
    parts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(p.rstrip(".;") for p in parts) or type(exc).__name__


PRINT_CONFIG_FLAGS = ("--print-config", "--cfg job", "--cfg=job", "-c job")


def split_print_config(argv: list[str]) -> tuple[list[str], bool]:
    """Take `--print-config` (or Hydra's own `--cfg job` / `-c job`) out of a command line:
    print the resolved config and exit instead of training. `--cfg hydra|all` ask for Hydra's
    runtime section, which k2repro does not use (it composes, it does not run a Hydra app)."""
    out: list[str] = []
    show = False
    it = iter(argv)
    for a in it:
        if a == "--print-config":
            show = True
        elif a in ("--cfg", "-c") or a.startswith("--cfg="):
            what = a.split("=", 1)[1] if "=" in a else next(it, "")
            if what != "job":
                raise ConfigError(f"{a.split('=')[0]} {what or '(nothing)'}: only 'job' is supported (the resolved "
                                  "training config; k2repro has no Hydra runtime section), or use --print-config")
            show = True
        else:
            out.append(a)
    return out, show


def to_yaml(cfg: RunConfig) -> str:
    """The resolved, validated config as YAML, in the schema's order (what `--print-config`
    prints; loadable again with `--params`)."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def compose_dict(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """Compose the plain YAML tree (no schema): what DVC writes to params.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    directory = conf_dir()
    if not (directory / f"{config_name}.yaml").exists():
        raise ConfigError(f"config: no {config_name}.yaml in {directory}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as exc:  # Hydra raises several types; all are user errors here
        raise ConfigError(f"config: {hydra_message(exc)}") from None
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(data: dict) -> RunConfig:
    """Merge a plain dict onto the schema: unknown keys and wrong types fail here."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = _first_line(exc)
        hint = _schema_hint(str(key)) if key else ""  # a key that does not exist: the ones that do
        msg = f"{msg}: {hint}" if hint else msg
        raise ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}") from None
    assert isinstance(cfg, RunConfig)
    return cfg


def load_config(
    overrides: list[str] | None = None,
    config_name: str = "config",
    world_size: int | None = None,
) -> RunConfig:
    """Compose, type and validate. Raises ConfigError with a one-line message."""
    register_schema()
    cfg = from_dict(compose_dict(overrides, config_name))
    validate(cfg, world_size)
    return cfg


def load_params_file(path: str | os.PathLike, overrides: list[str] | None = None,
                     world_size: int | None = None) -> RunConfig:
    """Type and validate a composed config saved as YAML (DVC's params.yaml, a run's saved
    config), with optional `key=value` overrides on top. DVC stages read params.yaml so that
    `dvc exp run -S key=value` reaches them."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"params file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {p} is not valid YAML: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file {p} must hold a mapping")
    if overrides:
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override '{o}' is not key=value")
        try:
            dot = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])
            data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(data), dot), resolve=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override: {_first_line(exc)}") from None
    cfg = from_dict(data)
    validate(cfg, world_size)
    return cfg


def _need(cond: bool, key: str, rule: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {rule}")


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Rules that types cannot express. The first broken rule raises ConfigError."""
    m, t, o, p = cfg.model, cfg.train, cfg.optim, cfg.parallel
    ws = world_size if world_size is not None else p.nproc
    _need(p.nproc >= 1, "parallel.nproc", f"must be >= 1 (got {p.nproc})")
    _need(p.backend in BACKENDS, "parallel.backend", f"must be one of {BACKENDS} (got {p.backend!r})")
    for key, val in [
        ("model.n_layers", m.n_layers), ("model.d_model", m.d_model), ("model.n_heads", m.n_heads),
        ("model.n_kv_heads", m.n_kv_heads), ("model.ffn_dim", m.ffn_dim),
        ("model.vocab_size", m.vocab_size), ("model.max_seq_len", m.max_seq_len),
    ]:
        _need(val >= 1, key, f"must be >= 1 (got {val})")
    _need(m.d_model % m.n_heads == 0, "model.d_model", f"must be divisible by model.n_heads ({m.n_heads})")
    _need(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", f"must divide model.n_heads ({m.n_heads})")
    _need((m.d_model // m.n_heads) % 2 == 0, "model.d_model", "head dim must be even for RoPE")
    _need(o.lr > 0, "optim.lr", f"must be > 0 (got {o.lr})")
    _need(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr] (got {o.min_lr})")
    _need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0 (got {o.warmup_steps})")
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0 (got {o.weight_decay})")
    _need(0 <= o.beta1 < 1, "optim.beta1", f"must be in [0, 1) (got {o.beta1})")
    _need(0 <= o.beta2 < 1, "optim.beta2", f"must be in [0, 1) (got {o.beta2})")
    _need(o.clip_grad >= 0, "optim.clip_grad", f"must be >= 0, 0 disables (got {o.clip_grad})")
    _need(t.max_steps >= 1, "train.max_steps", f"must be >= 1 (got {t.max_steps})")
    _need(0 <= t.stop_at_step <= t.max_steps, "train.stop_at_step",
          f"must be in [0, train.max_steps] (got {t.stop_at_step})")
    _need(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1 (got {t.micro_batch_size})")
    _need(t.global_batch_size >= 1, "train.global_batch_size", f"must be >= 1 (got {t.global_batch_size})")
    _need(t.global_batch_size % (t.micro_batch_size * ws) == 0, "train.global_batch_size",
          f"must be divisible by train.micro_batch_size * world size = {t.micro_batch_size}*{ws} "
          f"(got {t.global_batch_size})")
    _need(t.seq_len >= 2, "train.seq_len", f"must be >= 2 (got {t.seq_len})")
    _need(t.seq_len <= m.max_seq_len, "train.seq_len",
          f"must be <= model.max_seq_len = {m.max_seq_len} (got {t.seq_len})")
    _need(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS} (got {t.precision!r})")
    _need(all(1 <= s <= t.max_steps for s in t.skip_steps), "train.skip_steps",
          f"steps must be in [1, train.max_steps] (got {t.skip_steps})")
    c = cfg.ckpt
    _need(c.interval >= 0, "ckpt.interval", f"must be >= 0, 0 disables (got {c.interval})")
    _need(c.keep_last >= 0, "ckpt.keep_last", f"must be >= 0, 0 keeps all (got {c.keep_last})")
    _need(c.grace_s >= 1, "ckpt.grace_s", f"must be >= 1 second (got {c.grace_s})")
    a = cfg.audit
    _need(a.flush_every >= 1, "audit.flush_every", f"must be >= 1 (got {a.flush_every})")
    _need(a.layer_stats_every >= 0, "audit.layer_stats_every", f"must be >= 0, 0 disables (got {a.layer_stats_every})")
    _need(a.queue_size >= 1, "audit.queue_size", f"must be >= 1 (got {a.queue_size})")
    g = cfg.guard
    _need(g.action in GUARD_ACTIONS, "guard.action", f"must be one of {GUARD_ACTIONS} (got {g.action!r})")
    _need(g.max_rollbacks >= 0, "guard.max_rollbacks", f"must be >= 0 (got {g.max_rollbacks})")
    _need(g.threshold > 0, "guard.threshold", f"must be > 0 (got {g.threshold})")
    _need(g.signal in ("loss", "grad_norm"), "guard.signal", f"must be 'loss' or 'grad_norm' (got {g.signal!r})")
    _need(g.short_window >= 4, "guard.short_window", f"must be >= 4 (got {g.short_window})")
    _need(g.long_window >= 2, "guard.long_window", f"must be >= 2 (got {g.long_window})")
    f = cfg.faults
    _need(0 < f.bad_batch_fraction <= 1, "faults.bad_batch_fraction",
          f"must be in (0, 1] (got {f.bad_batch_fraction})")
    _need(f.bad_batch_kind in BAD_BATCH_KINDS, "faults.bad_batch_kind",
          f"must be one of {BAD_BATCH_KINDS} (got {f.bad_batch_kind!r})")
    _need(f.kill_phase in KILL_PHASES, "faults.kill_phase", f"must be one of {KILL_PHASES} (got {f.kill_phase!r})")
    _need(0 <= f.kill_rank < max(ws, 1), "faults.kill_rank", f"must be in [0, world size {ws}) (got {f.kill_rank})")
    _need(f.lr_spike_factor > 0, "faults.lr_spike_factor", f"must be > 0 (got {f.lr_spike_factor})")
    d = cfg.data
    _need(0 <= d.val_fraction < 1, "data.val_fraction", f"must be in [0, 1) (got {d.val_fraction})")
    _need(d.vocab_size >= 260, "data.vocab_size", f"must be >= 260 (256 bytes + specials) (got {d.vocab_size})")
    _need(bool(d.tokenizer) or d.vocab_size <= m.vocab_size, "data.vocab_size",  # supplied: checked by tokenize
          f"must be <= model.vocab_size = {m.vocab_size} (got {d.vocab_size})")
    _need(0 < d.dedup_threshold <= 1, "data.dedup_threshold", f"must be in (0, 1] (got {d.dedup_threshold})")


def packed_window_note(train_seq_len: int, packed_seq_len: int, packed_dir: str | os.PathLike) -> dict | None:
    """What a `train.seq_len` shorter than the packed windows costs, or None when it costs
    nothing. Training cuts every window to its first `train.seq_len + 1` tokens and never
    sees the rest: legal (a short-context warm-up), but silent data loss when unintended, so
    the trainer warns once and records this as a `data_window_cut` event."""
    if train_seq_len >= packed_seq_len:
        return None
    used = (train_seq_len + 1) / (packed_seq_len + 1)
    return {
        "train_seq_len": int(train_seq_len), "packed_seq_len": int(packed_seq_len), "share_used": round(used, 4),
        "message": (f"train.seq_len={train_seq_len} is shorter than the {packed_seq_len}-token windows packed in "
                    f"{Path(packed_dir).name}: every sample is cut to its first {train_seq_len + 1} of "
                    f"{packed_seq_len + 1} tokens ({100 * used:.0f}%), the rest is never trained on "
                    f"(re-pack with seq_len {train_seq_len} to train on all of it)"),
    }


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for every leaf (lists stay whole: they are one hyperparameter)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the canonical JSON of the resolved config, minus keys that do not change the
    computation (names, tags, paths of the store, checkpoints and data, resume/dry-run switches)."""
    d = to_dict(cfg)
    d.pop("run", None)
    d["audit"] = {k: v for k, v in d["audit"].items() if k not in ("store",)}
    # when state is saved (the last step, the grace after a signal) never changes the numbers
    d["ckpt"] = {k: v for k, v in d["ckpt"].items() if k not in ("dir", "final", "grace_s")}
    # where the data lives is not what it is: the data manifest's sha256 says that
    d["data"] = {k: v for k, v in d["data"].items() if k not in ("source", "work_dir", "packed_dir")}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("resume", "dry_run", "stop_at_step")}
    return canonical_hash(d)
