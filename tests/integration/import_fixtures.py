"""Writers of the importers' test fixtures, in every source format, built from scratch here (no
external logger): Megatron-LM logs, W&B chart exports, TensorBoard event files (TFRecord +
hand-encoded Event protocol buffers) and generic CSV/JSONL.

The loss curves are smooth decays with a little noise, so that one injected spike stands out.
"""

from __future__ import annotations

import csv
import json
import math
import random
import struct
from pathlib import Path

SPIKE = 3.0


def loss_curve(n: int, spike_at: int | None = None, seed: int = 0, shift: float = 0.0) -> dict[int, float]:
    rng = random.Random(seed)
    out = {}
    for i in range(1, n + 1):
        v = 2.0 + 4.0 * math.exp(-i / 40) + rng.gauss(0, 0.01) + shift
        if spike_at is not None and i == spike_at:
            v += SPIKE
        out[i] = v
    return out


# ----------------------------------------------------------------------------- Megatron-LM

ARGS = {"micro_batch_size": "1", "global_batch_size": "8", "seq_length": "2048", "world_size": "8",
        "lr": "0.0003", "train_iters": "120", "log_interval": "1", "fp16": "True", "bf16": "False",
        "seed": "1234", "hf_token": "hf_SECRETVALUE12345", "data_path": "['/data/a', '/data/b']",
        "tokenizer_type": "GPT2BPETokenizer", "load": "None"}


def _args_block(args: dict[str, str], prefix: str = "") -> list[str]:
    lines = [f"{prefix}------------------------ arguments ------------------------"]
    for k in sorted(args):
        lines.append(f"{prefix}  {k} {'.' * max(3, 48 - len(k))} {args[k]}")
    lines.append(f"{prefix}-------------------- end of arguments ---------------------")
    return lines


def megatron_line(i: int, total: int, loss: float | None, lr: float = 3e-4, grad: float | None = 1.1,
                  skipped: int = 0, nan: int = 0, ts: str | None = None) -> str:
    parts = [f" iteration {i:8d}/{total:8d} | consumed samples: {i * 8:12d} | "
             f"elapsed time per iteration (ms): {1234.5 + i:.1f} | learning rate: {lr:.6E} | "
             f"global batch size: {8:5d} |"]
    if loss is not None:
        parts.append(f" lm loss: {loss:.6E} |")
    parts.append(f" loss scale: {65536.0 if not skipped else 32768.0:.1f} |")
    if grad is not None:
        parts.append(f" grad norm: {grad:.3f} |")
    parts.append(f" number of skipped iterations: {skipped:3d} | number of nan iterations: {nan:3d} |")
    text = "".join(parts)
    return (f"[{ts}]" + text) if ts else text


def write_megatron_log(path: Path, n: int = 120, spike_at: int = 80, skip_at: int = 50,
                       restart_after: int = 100, resume_at: int = 96, timestamps: bool = True) -> dict:
    """A log with an arguments block, noise lines, a spike at `spike_at`, a skipped iteration at
    `skip_at` (no loss, no grad norm: Megatron prints neither), and a restart: after iteration
    `restart_after` the job dies, a new one prints its arguments, loads the checkpoint of
    `resume_at - 1` and logs `resume_at..n` again (different values: the later ones count)."""
    curve = loss_curve(n, spike_at)
    later = {i: v + 0.001 for i, v in curve.items()}
    lines = ["using world size: 8, data-parallel size: 8", *(_args_block(ARGS)),
             "> building GPT2BPETokenizer tokenizer ...", "training ..."]

    def ts(i: int) -> str | None:
        if not timestamps:
            return None
        s = 3 * i
        return f"2024-01-01 12:{s // 60 % 60:02d}:{s % 60:02d}"

    for i in range(1, restart_after + 1):
        if i == skip_at:
            lines.append(megatron_line(i, n, None, grad=None, skipped=1, ts=ts(i)))
        else:
            lines.append(megatron_line(i, n, curve[i], ts=ts(i)))
        if i % 25 == 0:
            lines.append(f"(min, max) time across ranks (ms):\n    forward-backward ...: ({i}.0, {i}.5)")
            lines.append(f" validation loss at iteration {i} | lm loss value: {curve[i]:.6E} | "
                         f"lm loss PPL: {math.exp(curve[i]):.6E} |")
    lines.append("srun: error: node17: task 3: Killed")
    lines += _args_block(dict(ARGS, load="/ckpt"), prefix="")
    lines.append(f" successfully loaded checkpoint from /ckpt at iteration {resume_at - 1}")
    lines.append("training ...")
    for i in range(resume_at, n + 1):
        lines.append(megatron_line(i, n, later[i], ts=ts(i + 1000)))
    path.write_text("\n".join(lines) + "\n")
    truth = {i: v for i, v in curve.items() if i < resume_at}
    truth.update({i: v for i, v in later.items() if i >= resume_at})
    del truth[skip_at]
    return {"loss": truth, "spike_at": spike_at, "skip_at": skip_at, "resume_at": resume_at, "n": n}


# ----------------------------------------------------------------------------- W&B chart export

def write_wandb_csv(path: Path, n: int = 120, spike_at: int = 80) -> dict:
    """Two runs: `k2-stage1` logs every step (its envelope equals its value: not sampled) and
    has a spike; `k2-stage2` starts at step 41 and W&B bucketed it (irregular steps, __MIN <
    __MAX), so it is sampled. Empty cells where a run has no point."""
    a = loss_curve(n, spike_at, seed=1)
    b_steps = [s for s in range(41, n + 1) if s % 3 == 0 or s % 7 == 0]
    b = loss_curve(n, None, seed=2, shift=0.1)
    header = ["Step"]
    for run in ("k2-stage1", "k2-stage2"):
        for metric in ("train/loss", "grad_norm", "learning-rate", "throughput/weird"):
            header += [f"{run} - {metric}", f"{run} - {metric}__MIN", f"{run} - {metric}__MAX"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(header)
        for s in range(1, n + 1):
            row: list[str] = [str(s)]
            vals_a = {"train/loss": a[s], "grad_norm": 1.0 + s / 1000, "learning-rate": 3e-4,
                      "throughput/weird": 100.0 + s}
            for m in ("train/loss", "grad_norm", "learning-rate", "throughput/weird"):
                v = vals_a[m]
                row += [repr(v), repr(v), repr(v)]
            if s in b_steps:
                vals_b = {"train/loss": b[s], "grad_norm": 0.9, "learning-rate": 2e-4,
                          "throughput/weird": 50.0}
                for m in ("train/loss", "grad_norm", "learning-rate", "throughput/weird"):
                    v = vals_b[m]
                    row += [repr(v), repr(v - 0.05), repr(v + 0.05)]
            else:
                row += [""] * 12
            w.writerow(row)
    return {"a": a, "b": {s: b[s] for s in b_steps}, "spike_at": spike_at}


# ----------------------------------------------------------------------------- TensorBoard

def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wt: int, payload: bytes) -> bytes:
    key = _varint((num << 3) | wt)
    if wt == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = _crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tf_record(payload: bytes) -> bytes:
    hdr = struct.pack("<Q", len(payload))
    return hdr + struct.pack("<I", _masked(hdr)) + payload + struct.pack("<I", _masked(payload))


def tb_event(step: int, wall: float, tag: str | None = None, value: float | None = None,
             style: str = "simple", first: bool = False, session_start: bool = False,
             file_version: bool = False) -> bytes:
    ev = _field(1, 1, struct.pack("<d", wall)) + _field(2, 0, _varint(step))
    if file_version:
        ev += _field(3, 2, b"brain.Event:2")
    if session_start:
        ev += _field(7, 2, _field(1, 0, _varint(1)))
    if tag is not None:
        val = _field(1, 2, tag.encode())
        if style == "simple":
            val += _field(2, 5, struct.pack("<f", value))
        else:  # TF2: a 0-d DT_FLOAT tensor, metadata (plugin "scalars") on the tag's first value
            tensor = _field(1, 0, _varint(1)) + _field(2, 2, b"") + _field(4, 2, struct.pack("<f", value))
            val += _field(8, 2, tensor)
            if first:
                val += _field(9, 2, _field(1, 2, _field(1, 2, b"scalars")))
        ev += _field(5, 2, _field(1, 2, val))
    return ev


def write_tb_file(path: Path, series: dict[str, dict[int, float]], style: str = "simple",
                  wall0: float = 1.7e9, session_start: bool = False) -> Path:
    """One event file: a file_version event, then one event per (step, tag)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [tf_record(tb_event(0, wall0, file_version=True, session_start=session_start))]
    seen: set[str] = set()
    steps = sorted({s for v in series.values() for s in v})
    for s in steps:
        for tag, vals in series.items():
            if s in vals:
                recs.append(tf_record(tb_event(s, wall0 + s, tag, vals[s], style=style,
                                               first=tag not in seen)))
                seen.add(tag)
    # a non-scalar summary (a histogram-like tensor with a dimension) that must be ignored
    path.write_bytes(b"".join(recs))
    return path


# ----------------------------------------------------------------------------- generic

def write_generic_csv(path: Path, n: int = 120, spike_at: int | None = 80) -> dict[int, float]:
    curve = loss_curve(n, spike_at, seed=3)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iter", "train/loss", "lr", "my_metric", "note"])
        for i in range(1, n + 1):
            w.writerow([i, repr(curve[i]), 3e-4, i * 0.5, "ok" if i % 2 else "fine"])
    return curve


def write_generic_jsonl(path: Path, n: int = 120) -> dict[int, float]:
    curve = loss_curve(n, None, seed=4)
    with open(path, "w") as f:
        for i in range(1, n + 1):
            f.write(json.dumps({"iter": i, "train": {"loss": curve[i]}, "lr": 3e-4, "tag": "x"}) + "\n")
    return curve
