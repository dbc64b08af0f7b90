"""The online guard applies forensics' offline rule exactly: same flags on the same series."""

from __future__ import annotations

import numpy as np
import torch

from k2repro.config.schema import GuardConfig
from k2repro.core.spike import RobustZ
from k2repro.forensics.detect import robust_z
from k2repro.train.guard import LogGuard, SpikeGuard


def _series(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = 2.0 + 6.0 * np.exp(-t / 40.0) + rng.normal(0, 0.03, n)  # fast-falling early loss
    for s, h in ((60, 1.5), (150, 0.8), (151, 0.6), (300, 2.0)):
        x[s] += h
    x[250] = np.nan
    return x


def test_online_flags_equal_offline_flags() -> None:
    x = _series()
    g = GuardConfig(action="skip")
    guard = SpikeGuard(g, torch.device("cpu"))
    online = []
    for v in x:
        apply, flag = guard.observe(torch.tensor(v, dtype=torch.float32).double(), torch.tensor(1.0))
        online.append(bool(flag))
        assert bool(apply) == (not bool(flag))
    offline = robust_z(x, RobustZ(short_window=g.short_window, long_window=g.long_window,
                                  threshold=g.threshold, min_history=g.min_history)).flags
    offline = offline | ~np.isfinite(x)
    assert np.array_equal(np.array(online), offline)
    assert online[60] and online[300] and online[250], "injected spikes and the NaN are flagged"
    assert sum(online) <= 6


def test_guard_state_round_trip() -> None:
    x = _series(seed=1)
    g = GuardConfig(action="skip")
    a, b = SpikeGuard(g, torch.device("cpu")), SpikeGuard(g, torch.device("cpu"))
    for v in x[:200]:
        a.observe(torch.tensor(v), torch.tensor(1.0))
    b.load_state_dict(a.state_dict())
    for v in x[200:]:
        fa, fb = a.observe(torch.tensor(v), torch.tensor(1.0))[1], b.observe(torch.tensor(v), torch.tensor(1.0))[1]
        assert bool(fa) == bool(fb)


def test_a_guard_that_only_logs_flags_on_the_host_what_the_device_guard_flags() -> None:
    # guard.action=log never touches the step (no device guard: nothing is masked); its flags
    # come from LogGuard at each flush, over the flushed rows, and must be the same flags
    x = _series()
    device = SpikeGuard(GuardConfig(action="skip"), torch.device("cpu"))
    want = [bool(device.observe(torch.tensor(v), torch.tensor(1.0))[1]) for v in x]
    host = LogGuard(GuardConfig(action="log"))
    got: list[bool] = []
    for i in range(0, len(x), 7):  # flushes of 7 rows
        got += host.flags([{"loss": float(v), "grad_norm": 1.0} for v in x[i:i + 7]])
    assert got == want and sum(got) >= 3
