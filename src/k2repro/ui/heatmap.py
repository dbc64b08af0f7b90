"""The layer heatmap's arithmetic: a parameter x step-bucket grid of max/min/sum/count cells,
filled from the per-run block cache and from raw `layer_stats` rows, so any aggregate of any
range is exact. Apart from the store reader (ui/data.py) because it is numpy, not SQL."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.ui.data import StoreReader

log = logging.getLogger(__name__)

CACHE_BLOCKS = 4_096      # blocks of the per-run layer cache


def natural_key(s: str) -> list[Any]:
    """Sort key: `layers.2` before `layers.10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class LayerCache:
    """Per (run, column): max/min/sum/count per (parameter, block of K steps) up to the last
    step seen when it was built, as numpy arrays. A heatmap of a wide range is then aggregated
    from ~4k blocks per parameter instead of the raw rows (a bare scan of one column of 100M
    rows is ~1 s); steps logged after the build (a run still training) are aggregated raw and
    added. Built on the first request that needs it (the one-time cost bench/ui.py reports)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], dict[str, Any]] = {}
        self._building: dict[tuple[str, str], threading.Lock] = {}
        self.build_s: dict[tuple[str, str], float] = {}

    def peek(self, run_id: str, col: str) -> dict[str, Any] | None:
        with self._lock:
            return self._entries.get((run_id, col))

    def get(self, reader: StoreReader, run_id: str, col: str, first: int, last: int) -> dict[str, Any]:
        key = (run_id, col)
        with self._lock:
            entry = self._entries.get(key)
            lock = self._building.setdefault(key, threading.Lock())
        if entry is not None:
            return entry
        with lock:  # one build per key; other requests wait for it
            with self._lock:
                entry = self._entries.get(key)
            if entry is not None:
                return entry
            t0 = time.perf_counter()
            k = max(1, math.ceil((last - first + 1) / CACHE_BLOCKS))
            with reader.cursor() as cur:
                tbl = cur.execute(
                    f"SELECT param, (step - ?) // ? AS blk, max({col}) AS mx, min({col}) AS mn, sum({col}) AS sm, "
                    f"count({col}) AS ct FROM layer_stats WHERE run_id = ? AND step BETWEEN ? AND ? "
                    f"AND isfinite({col}) GROUP BY ALL", [first, k, run_id, first, last]).fetchnumpy()
            params = sorted(set(tbl["param"].tolist()), key=natural_key)
            idx = {p: i for i, p in enumerate(params)}
            entry = {"first": first, "last": last, "k": k, "params": params,
                     "p": np.array([idx[p] for p in tbl["param"].tolist()], dtype=np.int64),
                     "blk": np.asarray(tbl["blk"], dtype=np.int64), "mx": np.asarray(tbl["mx"], dtype=float),
                     "mn": np.asarray(tbl["mn"], dtype=float), "sm": np.asarray(tbl["sm"], dtype=float),
                     "ct": np.asarray(tbl["ct"], dtype=float)}
            with self._lock:
                self._entries[key] = entry
                self.build_s[key] = time.perf_counter() - t0
            log.info("layer cache %s/%s: %d blocks of %d steps in %.2f s", run_id, col, len(entry["blk"]), k,
                     self.build_s[key])
            return entry



class Cells:
    """max, min, sum and count per (parameter, bucket), flat (parameter-major)."""

    def __init__(self, size: int) -> None:
        self.mx, self.mn = np.full(size, -np.inf), np.full(size, np.inf)
        self.sm, self.ct = np.zeros(size), np.zeros(size)

    @classmethod
    def from_cache(cls, entry: dict[str, Any], lo: int, hi: int, nb: int) -> tuple[int, int, Cells]:
        """The cached blocks in lo..hi, with the range snapped out to block edges (returned),
        so every cell is the exact aggregate of the steps it names."""
        k, base = entry["k"], entry["first"]
        lo = base + (lo - base) // k * k
        if hi <= entry["last"]:
            hi = min(entry["last"], base + (hi - base) // k * k + k - 1)
        b0 = base + entry["blk"] * k
        keep = (b0 + k - 1 >= lo) & (b0 <= hi)
        b = np.clip((b0[keep] - lo) * nb // (hi - lo + 1), 0, nb - 1)
        cells = cls(len(entry["params"]) * nb)
        cells.add(entry["p"][keep] * nb + b, entry["mx"][keep], entry["mn"][keep], entry["sm"][keep],
                  entry["ct"][keep])
        return lo, hi, cells

    def add(self, flat: np.ndarray, mx: Any, mn: Any, sm: Any, ct: Any) -> None:
        np.maximum.at(self.mx, flat, np.asarray(mx, dtype=float))
        np.minimum.at(self.mn, flat, np.asarray(mn, dtype=float))
        np.add.at(self.sm, flat, np.asarray(sm, dtype=float))
        np.add.at(self.ct, flat, np.asarray(ct, dtype=float))

    def grow(self, n: int) -> None:
        """Room for parameters that appeared after the cache was built (rare)."""
        self.mx, self.mn = np.concatenate([self.mx, np.full(n, -np.inf)]), np.concatenate([self.mn, np.full(n, np.inf)])
        self.sm, self.ct = np.concatenate([self.sm, np.zeros(n)]), np.concatenate([self.ct, np.zeros(n)])

    def values(self, agg: str, n_params: int, nb: int) -> list[list[float | None]]:
        with np.errstate(invalid="ignore", divide="ignore"):
            v = self.mx if agg == "max" else self.mn if agg == "min" else self.sm / self.ct
        v = np.where(self.ct > 0, v, np.nan).reshape(n_params, nb)
        # 7 significant digits are more than a colour or a hover needs, and halve the JSON
        return [[None if x != x else float(f"{x:.7g}") for x in row] for row in v.tolist()]


def merge_rows(params: list[str], cells: Cells | None, extra: dict[str, Any], nb: int) -> tuple[list[str], Cells]:
    """Raw rows (param, bucket b, mx, mn, sm, ct) merged in numpy (a Python loop over 60k cells
    cost ~0.3 s); without cached cells, the grid is made for the parameters the rows name."""
    names = [str(p) for p in np.asarray(extra["param"]).tolist()]
    new = sorted(set(names) - set(params), key=natural_key)
    if cells is None:
        params = new
        cells = Cells(len(params) * nb)
    elif new:
        cells.grow(len(new) * nb)
        params = params + new
    if names:
        idx = {p: i for i, p in enumerate(params)}
        flat = np.array([idx[p] for p in names], dtype=np.int64) * nb + np.asarray(extra["b"], dtype=np.int64)
        cells.add(flat, extra["mx"], extra["mn"], extra["sm"], extra["ct"])
    return params, cells


def bucket_starts(lo: int, hi: int, nb: int, block: int | None) -> list[int]:
    """First step of each bucket; with the cache (`block` steps a block) bucket i starts at its
    first whole block: the first j with j*k >= i*W/nb."""
    w = hi - lo + 1
    if block is not None:
        return [lo + _ceil_div(_ceil_div(i * w, nb), block) * block for i in range(nb)]
    return [lo + math.floor(i * w / nb) for i in range(nb)]


__all__ = ["CACHE_BLOCKS", "Cells", "LayerCache", "bucket_starts", "merge_rows", "natural_key"]
