"""A tiny real OLMo-core training run for the olmo_core tests and bench/integrations.py.

Run under torchrun (2 gloo ranks on CPU):

    torchrun --nproc-per-node=2 tests/integration/olmo_core_harness.py --work DIR --store STORE

What makes OLMo-core 3.0 train on a CPU-only torch (facts checked in issue 21):
`prepare_training_environment(backend="gloo")`, a tiny `TransformerConfig.llama_like`, FSDP
with float32 param/reduce dtypes, a raw uint16 token memmap read by `NumpyFSLDatasetConfig`,
`num_workers=0`, compile off. The token file is built here (a seeded random stream) if absent.

Test-only hooks (not part of the integration; they observe OLMo-core, never change it):
- `--record FILE`: rank 0 writes OLMo-core's own reduced metrics per step and every rank writes
  the token ids and instance indices it consumed (FILE.r<rank>.json), so the tests compare the
  store with OLMo-core's numbers and `k2repro batch` with the tokens that trained;
- `--hold-at N`: after step N, rank 0 writes `<work>/held` and sleeps, so the test can SIGKILL a
  run at a known step; rank 1 waits in the next collective.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

VOCAB = 256
SEQ = 32


def token_file(path: Path, n_tokens: int = 64 * 1024, seed: int = 1234) -> Path:
    """A raw uint16 token stream (what OLMo-core's numpy datasets read), built atomically."""
    if not path.exists():
        rng = np.random.default_rng(seed)
        # a few repeating patterns so the loss falls visibly within 20 steps
        base = rng.integers(1, VOCAB, size=(64, SEQ), dtype=np.uint16)
        rows = base[rng.integers(0, 64, size=n_tokens // SEQ)]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        rows.reshape(-1).astype(np.uint16).tofile(tmp)
        os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="folder for the token file, checkpoints, data work dir")
    ap.add_argument("--store", default=None, help="k2repro store; omit to train without the callback")
    ap.add_argument("--tokens", default=None, help="token file (default: <work>/tokens.npy, built if absent)")
    ap.add_argument("--save", default=None, help="OLMo-core save folder (default: <work>/ckpt)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-interval", type=int, default=10)
    ap.add_argument("--layer-stats-every", type=int, default=5)
    ap.add_argument("--flush-every", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--name", default="olmo-tiny")
    ap.add_argument("--skip-step-adamw", action="store_true",
                    help="OLMo-core's SkipStepAdamW (its skip decision per step is a metric)")
    ap.add_argument("--skip-steps", type=int, nargs="*", default=[],
                    help="steps the trainer skips on purpose (TrainerConfig.steps_to_skip)")
    ap.add_argument("--record", default=None)
    ap.add_argument("--hold-at", type=int, default=0)
    ap.add_argument("--timings", default=None,
                    help="each rank writes its step wall times, the callback's host time and the audit "
                         "writer thread's CPU time to TIMINGS.r<rank>.json")
    a = ap.parse_args()

    from olmo_core.config import DType
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.distributed.utils import get_rank
    from olmo_core.nn.transformer import TransformerConfig
    from olmo_core.optim import AdamWConfig, SkipStepAdamWConfig
    from olmo_core.train import (
        Duration,
        TrainerConfig,
        prepare_training_environment,
        teardown_training_environment,
    )
    from olmo_core.train.callbacks import Callback, CheckpointerCallback
    from olmo_core.train.common import StepSkipRange
    from olmo_core.train.train_module import (
        TransformerDataParallelConfig,
        TransformerTrainModuleConfig,
    )

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prepare_training_environment(seed=a.seed, backend="gloo")
    rank = get_rank()
    tokens = Path(a.tokens) if a.tokens else work / "tokens.npy"
    if rank == 0:
        token_file(tokens)
    import torch.distributed as dist

    dist.barrier()

    tok = TokenizerConfig(vocab_size=VOCAB, eos_token_id=0, pad_token_id=0)
    model_cfg = TransformerConfig.llama_like(d_model=a.d_model, vocab_size=VOCAB, n_layers=a.layers, n_heads=4)
    model = model_cfg.build(init_device="cpu")
    dataset = NumpyFSLDatasetConfig(tokenizer=tok, paths=[str(tokens)], dtype="uint16", sequence_length=SEQ,
                                    work_dir=str(work / "data-work")).build()
    loader = NumpyDataLoaderConfig(global_batch_size=8 * SEQ, seed=a.seed, num_workers=0,
                                   work_dir=str(work / "data-work")).build(dataset)
    train_module = TransformerTrainModuleConfig(
        rank_microbatch_size=4 * SEQ, max_sequence_length=SEQ,
        optim=(SkipStepAdamWConfig if a.skip_step_adamw else AdamWConfig)(lr=3e-3, weight_decay=0.0),
        max_grad_norm=1.0, z_loss_multiplier=1e-4,
        compile_model=False,
        dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp, param_dtype=DType.float32,
                                                reduce_dtype=DType.float32),
    ).build(model, device=None)

    callbacks: dict = {"checkpointer": CheckpointerCallback(save_interval=a.save_interval, save_async=False,
                                                            pre_train_checkpoint=False)}
    audit = None
    if a.store:
        from k2repro.integrations.olmo_core import K2ReproCallback

        # the one line a user adds (docs/integrations.md)
        audit = K2ReproCallback(a.store, name=a.name, layer_stats_every=a.layer_stats_every,
                                flush_every=a.flush_every,
                                config={"model": model_cfg, "seed": a.seed, "steps": a.steps})
        callbacks["k2repro"] = audit

    class Observe(Callback):
        """Test-only: OLMo-core's own numbers and the batches it fed, and the hold point."""

        priority = 5

        def __init__(self) -> None:
            self.metrics: dict[int, dict] = {}
            self.consumed: dict[int, dict] = {}
            self.walls: list[float] = []
            self._t = None

        def pre_step(self, batch):  # noqa: ANN001
            self.consumed[self.step] = {"index": [int(x) for x in batch["index"]],
                                        "input_ids": batch["input_ids"].tolist()}

        def pre_train(self) -> None:
            if a.hold_at:  # the test kills each worker's process group (own sessions under torch 2.13)
                (work / f"pid.r{rank}").write_text(str(os.getpid()))

        def post_step(self) -> None:
            now = time.perf_counter()
            if self._t is not None:
                self.walls.append(now - self._t)
            self._t = now
            if a.record and rank == 0 and audit is not None and not Path(f"{a.record}.runid").exists():
                Path(f"{a.record}.runid").write_text(str(audit.run_id))
            if a.hold_at and self.step == a.hold_at and rank == 0:
                (work / "held").write_text(str(self.step))
                while True:
                    time.sleep(1)

        def log_metrics(self, step, metrics):  # noqa: ANN001
            self.metrics.setdefault(step, {}).update(metrics)

        def close(self) -> None:
            if a.record:
                out = {"consumed": self.consumed}
                if rank == 0:
                    out["metrics"] = self.metrics
                    out["fingerprint"] = self.trainer.data_loader.dataset.fingerprint
                    out["n_params"] = sum(p.numel() for p in self.trainer.train_module.model.parameters())
                    out["run_id"] = audit.run_id if audit is not None else None
                Path(f"{a.record}.r{rank}.json").write_text(json.dumps(out))

    callbacks["observe"] = Observe()
    trainer = TrainerConfig(save_folder=str(Path(a.save) if a.save else work / "ckpt"),
                            max_duration=Duration.steps(a.steps), metrics_collect_interval=5,
                            callbacks=callbacks, save_overwrite=True,
                            steps_to_skip=[StepSkipRange(s, s + 1) for s in a.skip_steps] or None,
                            ).build(train_module, loader)
    trainer.fit()
    if a.timings:  # after fit: the callback has closed its run, the writer thread is done
        sink = None if audit is None or audit.run is None else audit.run.sink
        Path(f"{a.timings}.r{rank}.json").write_text(json.dumps({
            "walls": callbacks["observe"].walls, "steps": a.steps,
            "host_s": None if audit is None else audit.host_s,
            "host_calls": None if audit is None else audit.host_calls,
            "host_cpu_s": None if audit is None else audit.host_cpu_s,
            "setup_s": None if audit is None else audit.setup_s,
            "writer_cpu_s": None if sink is None else sink.writer_cpu_s}))
    if rank == 0 and audit is not None:
        print("run_id=" + str(audit.run_id), flush=True)
    teardown_training_environment()


if __name__ == "__main__":
    main()
