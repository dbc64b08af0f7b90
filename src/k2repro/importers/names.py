"""The metric-name table: which source series fills which `steps` column, and `--map`.

Every importer asks the same question of each series it parses ("is `lm loss` our `loss`?"),
so the answer lives here once, as one declarative table, apart from parsing and writing. The
`steps` columns an import can fill, and their types, are read from `k2repro.audit.schema` (the
one home of the store's columns), not repeated here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from k2repro.audit.schema import columns
from k2repro.errors import BadInputError


def _steps_columns(type_: str) -> tuple[str, ...]:
    """The `steps` columns of one logical type, in schema order, without the key `step`."""
    return tuple(c.name for c in columns("steps") if c.type == type_ and c.name != "step")


#: `steps` columns an imported series can fill, by type (text columns such as `batch_hash`
#: are the trainer's own: no source has them).
STEP_FLOAT = _steps_columns("float64")
STEP_INT = _steps_columns("int64")
STEP_BOOL = _steps_columns("bool")
STEP_COLUMNS = (*STEP_FLOAT, *STEP_INT, *STEP_BOOL, *_steps_columns("timestamp"))

#: (target, scale) -> the source names that mean it (compared lower-cased, spaces trimmed). A
#: target that is a `steps` column fills it; any other target is a series of the `metrics`
#: table. Every `steps` column is also known by its own name (see DEFAULT_MAP).
ALIASES: Mapping[tuple[str, float], tuple[str, ...]] = {
    ("step", 1.0): ("step", "_step", "iteration", "iter", "global_step", "trainer/global_step",
                    "train/global_step"),
    ("loss", 1.0): ("loss", "lm loss", "lm_loss", "lm-loss", "train/loss", "train_loss", "training_loss",
                    "train/lm_loss", "train/lm loss", "train/loss_step", "lm-loss-training/lm loss"),
    ("grad_norm", 1.0): ("grad_norm", "grad-norm", "grad norm", "gradient_norm", "train/grad_norm",
                         "grad-norm/grad-norm", "optim/grad_norm"),
    ("lr", 1.0): ("lr", "learning-rate", "learning_rate", "learning rate", "train/lr",
                  "train/learning_rate", "optim/lr", "learning-rate/learning-rate"),
    ("loss_scale", 1.0): ("loss-scale", "loss_scale", "loss scale", "loss-scale/loss-scale"),
    ("step_time_s", 1.0): ("step_time_s", "step_time", "train/step_time", "iteration-time",
                           "iteration-time/iteration-time"),
    ("step_time_s", 1e-3): ("elapsed time per iteration (ms)", "elapsed_time_per_iteration_ms"),
    ("tokens_per_s", 1.0): ("tokens_per_s", "tokens_per_second", "train/tokens_per_second",
                            "throughput/tokens_per_s"),
    ("n_samples", 1.0): ("n_samples", "global batch size", "batch-size", "batch_size", "global_batch_size",
                         "batch-size/batch-size"),
    ("tokens", 1.0): ("tokens", "n_tokens", "batch_tokens"),
    ("consumed_samples", 1.0): ("consumed samples", "consumed_samples"),
    ("consumed_tokens", 1.0): ("consumed tokens", "consumed_tokens"),
    ("num_zeros", 1.0): ("num zeros", "num-zeros", "num_zeros"),
    ("params_norm", 1.0): ("params norm", "params-norm", "params_norm"),
    ("mfu", 1.0): ("mfu", "perf/mfu"),
    ("time", 1.0): ("time", "_timestamp", "timestamp"),
}

#: Source name -> (target, scale): every `steps` column by its own name, then ALIASES.
DEFAULT_MAP: Mapping[str, tuple[str, float]] = {
    **{c: (c, 1.0) for c in STEP_COLUMNS},
    **{name: target for target, names in ALIASES.items() for name in names},
}

#: Names a `--map` side is recognised as a k2repro target by.
KNOWN_TARGETS = frozenset({"step", *STEP_COLUMNS} | {t for t, _ in DEFAULT_MAP.values()})


def norm_name(name: str) -> str:
    return name.strip().lower()


@dataclass(frozen=True)
class NameMap:
    """The default table extended by `--map` pairs (source name -> (target, scale)); a target
    of None drops the series."""

    pairs: Mapping[str, tuple[str | None, float]]
    explicit: Mapping[str, str | None] = field(default_factory=dict)

    @classmethod
    def build(cls, specs: Sequence[str] = ()) -> NameMap:
        pairs: dict[str, tuple[str | None, float]] = dict(DEFAULT_MAP)
        explicit: dict[str, str | None] = {}
        for spec in specs:
            for item in spec.split(","):
                if not item.strip():
                    continue
                left, eq, right = item.partition("=")
                left, right = left.strip(), right.strip()
                if not eq or not left:
                    raise BadInputError(f"--map {item!r}: expected SOURCE=TARGET or TARGET=SOURCE")
                if not right:  # `--map name=`: leave that series out
                    pairs[norm_name(left)] = (None, 1.0)
                    explicit[norm_name(left)] = None
                    continue
                # Either order: `--map step=iter` (k2repro column first, as for generic CSV) or
                # `--map grad-norm=grad_norm` (W&B's old=new). The side that names a k2repro
                # column is the target; when both or neither do, the form is SOURCE=TARGET.
                lk, rk = left in KNOWN_TARGETS, right in KNOWN_TARGETS
                src, dst = (right, left) if lk and not rk else (left, right)
                pairs[norm_name(src)] = (dst, 1.0)
                explicit[norm_name(src)] = dst
        return cls(pairs, explicit)

    def target(self, name: str) -> tuple[str | None, float]:
        """(target, scale); an unmapped name keeps its own name as a `metrics` series."""
        return self.pairs.get(norm_name(name), (name.strip(), 1.0))

    def user_pairs(self) -> dict[str, str | None]:
        """The `--map` pairs as given (source -> target), for hparams and the options hash."""
        return dict(self.explicit)
