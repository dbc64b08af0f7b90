"""Typed config tree (docs/architecture.md, "Config names").

Hydra composes plain YAML from `conf/`; `k2repro.config.load` merges the result onto these
dataclasses once, so unknown keys and wrong types fail early, then `validate` checks the rules
that types cannot express. Nothing below the entry points imports omegaconf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    name: str = "tiny"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 172
    vocab_size: int = 512
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    name: str = "sample"
    # Inputs of the data pipeline: `inputs` (files, folders, globs) when set, else `source`.
    source: str = "data/sample"
    inputs: list[str] = field(default_factory=list)
    text_field: str = "text"
    id_field: str = "id"
    # Reader: auto (by extension; a folder of JSONL/Parquet files or of text files), jsonl,
    # parquet, text.
    format: str = "auto"
    work_dir: str = "data/work"
    # Packed token shards that the trainer reads (written by `k2repro data pack`).
    packed_dir: str = "data/work/packed"
    val_fraction: float = 0.05
    vocab_size: int = 512
    min_frequency: int = 2
    # a tokenizer.json to use instead of training one (empty: train; `k2repro data tokenize`)
    tokenizer: str = ""
    # training reads at most this many MB of the train split (a deterministic sample beyond it),
    # so its memory stays bounded on a large corpus (docs/data.md, "Tokenizer")
    tokenizer_train_mb: float = 256
    dedup_num_perm: int = 128
    dedup_threshold: float = 0.8
    dedup_ngram: int = 5
    dedup_bands: int = 0
    dedup_rows: int = 0
    max_docs: int = 0
    split_seed: int = 1234
    # The data stages' engine (docs/data.md): datatrove's `local` or `ray` executor (an existing
    # cluster at ray_address); `tasks` fixes the sharding and so every output byte, `workers`
    # only how many tasks run at once.
    executor: str = "local"
    ray_address: str = ""
    tasks: int = 1
    workers: int = 1
    # training re-hashes the packed files against their manifest before step 1 (rank 0), so the
    # recorded sha256 is that of the bytes trained on; turn off for very large data
    verify: bool = True


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    fused: bool = False


@dataclass
class TrainConfig:
    max_steps: int = 50
    stop_at_step: int = 0
    seed: int = 1234
    global_batch_size: int = 8
    micro_batch_size: int = 2
    seq_len: int = 64
    deterministic: bool = True
    precision: str = "fp32"
    resume: str = ""
    skip_steps: list[int] = field(default_factory=list)
    # data positions moved behind the rest of the stream (written by guard rollbacks, so that a
    # rolled-back run's config replays it exactly)
    defer_positions: list[int] = field(default_factory=list)
    # counterfactual replays (forensics --replay): at these steps, these samples weigh nothing
    mask_steps: list[int] = field(default_factory=list)
    mask_sample_ids: list[int] = field(default_factory=list)
    dry_run: bool = False
    log_every: int = 10
    compile: bool = False


@dataclass
class CkptConfig:
    interval: int = 0
    dir: str = ""
    keep_last: int = 0
    final: bool = True  # a checkpoint at the run's last step (a stopped run always writes one)
    grace_s: int = 30  # after SIGINT/SIGTERM: how long torchrun waits for the ranks before SIGKILL


@dataclass
class ParallelConfig:
    nproc: int = 1
    backend: str = "auto"


@dataclass
class AuditConfig:
    enabled: bool = True
    store: str = "runs"
    flush_every: int = 10
    layer_stats_every: int = 10
    sample_stats: bool = True
    heartbeat_s: float = 2.0
    queue_size: int = 1024


@dataclass
class GuardConfig:
    action: str = "log"
    max_rollbacks: int = 2
    signal: str = "loss"
    threshold: float = 6.0
    short_window: int = 16
    long_window: int = 128
    min_history: int = 32


@dataclass
class FaultsConfig:
    name: str = "none"
    bad_batch_steps: list[int] = field(default_factory=list)
    bad_batch_fraction: float = 0.25
    bad_batch_kind: str = "random"
    lr_spike_steps: list[int] = field(default_factory=list)
    lr_spike_factor: float = 50.0
    nan_step: int = 0
    kill_step: int = 0
    kill_rank: int = 0
    kill_phase: str = "step"


@dataclass
class RunMeta:
    name: str = "run"
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    run: RunMeta = field(default_factory=RunMeta)


PRECISIONS = ("fp32", "bf16")
BACKENDS = ("auto", "gloo", "nccl")
GUARD_ACTIONS = ("log", "skip", "rollback", "abort")
BAD_BATCH_KINDS = ("random", "repeat")
KILL_PHASES = ("step", "flush", "checkpoint")
