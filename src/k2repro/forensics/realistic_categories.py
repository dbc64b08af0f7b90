"""The categories of the forensics benchmark (`bench/forensics_truth.py`): for each, a recipe
that draws a few labelled logs (`realistic.build_log`) with the spikes, sampling and restarts
that category is about. Separate from `realistic.py`, which knows how to build one log and
nothing about the benchmark's mix. Everything is deterministic from the seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from k2repro.forensics.realistic import Curve, LabelledLog, SpikeSpec, build_log, random_curve

CATEGORIES = ("clean", "clean_sampled", "data_spikes", "slow_benign", "malignant", "restart",
              "sampled_spikes", "gaps_nans", "grad_norm")

# the logging intervals of the dense categories, cycled over their logs
DENSE_MODES = ("every:1", "every:1", "every:4", "every:10")
# how the sampled categories log: like W&B exports, sparse with bursts, every N, with gaps
SAMPLED_MODES = ("wandb:10000", "sparse:1000", "every:50", "gaps:10")
SAMPLED_MODES_QUICK = ("wandb:3000", "sparse:500")


def category_logs(category: str, seed: int = 0, quick: bool = False) -> list[LabelledLog]:
    """The logs of one benchmark category (fewer and shorter with `quick`)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r} (one of {', '.join(CATEGORIES)})")
    n_logs = 2 if quick else 8
    base = (CATEGORIES.index(category) + 1) * 1000 + seed * 100_000
    out = []
    for i in range(n_logs):
        sd = base + i
        rng = np.random.default_rng(sd + 7)
        out.append(_one(category, i, sd, rng, quick))
    return out


def _spike_steps(rng: np.random.Generator, n: int, k: int, lo_frac: float = 0.15,
                 min_sep: int = 1500) -> list[int]:
    """k onsets in the run, apart from each other and from the first 15% (the warmup)."""
    lo, hi = int(lo_frac * n), int(0.85 * n)
    out: list[int] = []
    tries = 0
    while len(out) < k and tries < 1000:
        tries += 1
        c = int(rng.integers(lo, hi))
        if all(abs(c - o) >= min_sep for o in out):
            out.append(c)
    return sorted(out)


def _sigma_at(curve: Curve, step: int) -> float:
    return float(curve.sigma_final * (1.0 + curve.sigma_boost / math.sqrt(1.0 + step / 200.0)))


def _one(cat: str, i: int, sd: int, rng: np.random.Generator, quick: bool) -> LabelledLog:
    """Log number i of category `cat`: its length and curve are drawn first (in this order,
    for every category), then the category's recipe draws the rest."""
    n = int(rng.integers(4000, 8000)) if quick else int(rng.integers(8000, 30000))
    name = f"{cat}-{i:02d}"
    cv = random_curve(np.random.default_rng(sd), n)
    return _RECIPES[cat](name, i, sd, rng, quick, n, cv)


def _long(sd: int, rng: np.random.Generator, quick: bool) -> tuple[int, Curve]:
    """A longer run for the sampled categories (sampling matters over 30k-240k steps)."""
    n = int(rng.integers(30_000, 60_000)) if quick else int(rng.integers(60_000, 240_000))
    return n, random_curve(np.random.default_rng(sd), n)


def _sampled_mode(i: int, quick: bool) -> str:
    return SAMPLED_MODES_QUICK[i % 2] if quick else SAMPLED_MODES[i % 4]


def _clean(name: str, i: int, sd: int, rng: np.random.Generator, quick: bool, n: int, cv: Curve) -> LabelledLog:
    return build_log(name, "clean", sd, n, DENSE_MODES[i % 4], curve=cv,
                     note="no spike: warmup, drift, plateaus, shrinking noise")


def _clean_sampled(name: str, i: int, sd: int, rng: np.random.Generator, quick: bool, n: int,
                   cv: Curve) -> LabelledLog:
    n, cv = _long(sd, rng, quick)
    bursts = tuple(int(x) for x in rng.integers(n // 5, n - n // 5, 3))
    return build_log(name, "clean_sampled", sd, n, _sampled_mode(i, quick), curve=cv, bursts=bursts,
                     note="no spike, sampled like real exports (dense bursts at random places)")


def _data_spikes(name: str, i: int, sd: int, rng: np.random.Generator, quick: bool, n: int,
                 cv: Curve) -> LabelledLog:
    steps = _spike_steps(rng, n, 2 if quick else 4, min_sep=300)
    sp = tuple(SpikeSpec("data" if j % 2 == 0 else "short", st,
                         size=float(rng.uniform(10, 40)) * _sigma_at(cv, st),
                         rise=int(rng.integers(1, 3)), decay=float(rng.uniform(2, 6)))
               for j, st in enumerate(steps))
    return build_log(name, "data_spikes", sd, n, "every:1", sp, curve=cv,
                     note="single-step and few-step spikes that recover at once")


def _slow_benign(name: str, i: int, sd: int, rng: np.random.Generator, quick: bool, n: int,
                 cv: Curve) -> LabelledLog:
    steps = _spike_steps(rng, n, 1 if quick else 2, min_sep=3000)
    sp = tuple(SpikeSpec("slow", st, size=float(rng.uniform(12, 50)) * _sigma_at(cv, st),
                         rise=int(rng.integers(1, 30)), decay=float(rng.uniform(40, 110)))
               for st in steps)
    return build_log(name, "slow_benign", sd, n, DENSE_MODES[i % 4], sp, curve=cv,
                     note="multi-hundred-step spikes that recover by themselves")


def _malignant(name: str, i: int, sd: int, rng: np.random.Generator, quick: bool, n: int,
               cv: Curve) -> LabelledLog:
    st = _spike_steps(rng, n, 1, lo_frac=0.3)[0]
    if i % 2 == 0:
        sp = (SpikeSpec("persistent", st, size=float(rng.uniform(12, 40)) * _sigma_at(cv, st),
                        rise=int(rng.integers(1, 20))),)
    else:
        sp = (SpikeSpec("divergence", st, size=float(rng.uniform(8, 15)) * _sigma_at(cv, st),
                        decay=float(rng.uniform(100, 400))),)
    return build_log(name, "malignant", sd, n, DENSE_MODES[i % 4], sp, curve=cv,
                     note="a jump to a higher level that stays, or a run-away")


def _restart(name: str, i: int, sd: int, rng: np.random.Generator, quick: bool, n: int,
             cv: Curve) -> LabelledLog:
    st = _spike_steps(rng, n, 1, lo_frac=0.3)[0]
    sp = (SpikeSpec("slow", st, size=float(rng.uniform(15, 60)) * _sigma_at(cv, st),
                    rise=int(rng.integers(1, 40)), decay=float(rng.uniform(300, 2000))),)
    back = int(rng.integers(100, 900))
    stop_after = int(rng.integers(150, 600))
    if i % 2 == 1 and st + stop_after + 1500 < n - 500:
        # as K2's second spike: a later, unrelated one on the restarted branch
        later = int(rng.integers(st + stop_after + 1000, n - 500))
        sp += (SpikeSpec("data", later, size=float(rng.uniform(15, 40)) * _sigma_at(cv, later)),)
    return build_log(name, "restart", sd, n, DENSE_MODES[i % 4], sp, curve=cv,
                     restart=(st, back, stop_after),
                     note="run-a spikes and is stopped; run-b resumes from a checkpoint "
                          "before the spike and does not spike there")


def _sampled_spikes(name: str, i: int, sd: int, rng: np.random.Generator, quick: bool, n: int,
                    cv: Curve) -> LabelledLog:
    n, cv = _long(sd, rng, quick)
    steps = _spike_steps(rng, n, 2 if quick else 3, min_sep=n // 6)
    kinds = ("slow", "persistent", "data")
    sp = tuple(SpikeSpec(kinds[(i + j) % 3], st, size=float(rng.uniform(15, 50)) * _sigma_at(cv, st)
                         if kinds[(i + j) % 3] != "data" else 40 * _sigma_at(cv, st),
                         rise=int(rng.integers(1, 20)), decay=float(rng.uniform(60, 200)))
               for j, st in enumerate(steps))
    return build_log(name, "sampled_spikes", sd, n, _sampled_mode(i, quick), sp, curve=cv,
                     note="spikes under W&B down-sampling, sparse logging with bursts, "
                          "every-N logging, gaps")


def _gaps_nans(name: str, i: int, sd: int, rng: np.random.Generator, quick: bool, n: int,
               cv: Curve) -> LabelledLog:
    steps = _spike_steps(rng, n, 4 if quick else 6, min_sep=500)
    mode = ("gaps:1", "gaps:4")[i % 2]
    every = int(mode.partition(":")[2])
    # on logged steps (a NaN between two logged points is not in the log at all)
    sp = tuple(SpikeSpec("nan", st - st % every) for st in steps)
    return build_log(name, "gaps_nans", sd, n, mode, sp, curve=cv,
                     note="missing stretches and isolated NaN points on a clean curve")


def _grad_norm(name: str, i: int, sd: int, rng: np.random.Generator, quick: bool, n: int,
               cv: Curve) -> LabelledLog:
    steps = _spike_steps(rng, n, 2 if quick else 3, min_sep=500)
    sp = tuple(SpikeSpec("grad_burst", st, size=float(rng.uniform(8, 30)),
                         length=int(rng.integers(1, 6))) for st in steps)
    return build_log(name, "grad_norm", sd, n, DENSE_MODES[i % 2], sp, curve=cv,
                     note="grad-norm bursts the loss does not show")


_RECIPES: dict[str, Callable[..., LabelledLog]] = {
    "clean": _clean, "clean_sampled": _clean_sampled, "data_spikes": _data_spikes,
    "slow_benign": _slow_benign, "malignant": _malignant, "restart": _restart,
    "sampled_spikes": _sampled_spikes, "gaps_nans": _gaps_nans, "grad_norm": _grad_norm,
}


__all__ = ["CATEGORIES", "category_logs"]
