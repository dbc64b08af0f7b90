"""`k2repro data {prepare,dedup,tokenize,pack}`: the data stages of the DVC pipeline.

Each stage composes the config like the trainer (`--config-name`, Hydra overrides
`key=value`), reads the previous stage's folder under `data.work_dir` and writes its own
folder atomically; `--in`/`--out` (and `--tokenizer` for pack) override those folders.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from k2repro.errors import BadInputError

RAW_ARGS = True  # Hydra overrides may come before or after the options
STAGES = {
    "prepare": "read the corpus (data.inputs, else data.source), normalise, split train/validation by document",
    "dedup": "remove exact and near duplicates (MinHash LSH); write a dedup report",
    "tokenize": "train a byte-level BPE tokenizer on the deduplicated train split (or use data.tokenizer)",
    "pack": "tokenize into fixed windows of train.seq_len + 1 tokens with a manifest",
}
DEFAULT_IN = {"prepare": "data.inputs or data.source", "dedup": "<work_dir>/prepared", "tokenize": "<work_dir>/dedup",
              "pack": "<work_dir>/dedup"}
DEFAULT_OUT = {"prepare": "<work_dir>/prepared", "dedup": "<work_dir>/dedup",
               "tokenize": "<work_dir>/tokenizer", "pack": "data.packed_dir"}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, help_ in STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_ + ".")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides, e.g. data.max_docs=200")
        p.add_argument("--config-name", default="config", help="config in conf/")
        p.add_argument("--params", metavar="FILE", help="a composed config as YAML instead of conf/ "
                       "(the DVC stages read params.yaml, so `dvc exp run -S` reaches them)")
        p.add_argument("--in", dest="inp", metavar="PATH", help=f"input (default {DEFAULT_IN[name]})")
        p.add_argument("--out", metavar="DIR", help=f"output folder (default {DEFAULT_OUT[name]})")
        if name == "pack":
            p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or tokenizer.json "
                           "(default <work_dir>/tokenizer)")
        p.add_argument("--json", action="store_true", help="print the stage summary as JSON")


def run_raw(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2repro data", description="data pipeline stages")
    configure(parser)
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    return run(args)


def _summary(stage: str, out: Path, result: dict) -> dict:
    if stage == "prepare":
        s = result["splits"]
        return {"n_docs": result["n_docs"], "train_docs": s["train"]["n_docs"], "val_docs": s["val"]["n_docs"],
                "n_bytes": s["train"]["n_bytes"] + s["val"]["n_bytes"], "empty_dropped": result["n_empty_dropped"]}
    if stage == "dedup":
        c = result["counts"]
        return {k: c[k] for k in ("input_docs", "exact_removed", "near_removed", "kept_docs", "dedup_ratio")} | {
            "clusters": len(result["clusters"]), "report": str(out / "report.md")}
    if stage == "tokenize":
        return {"vocab_size": result["vocab_size"], "eos_id": result["eos_id"],
                "tokenizer": str(out / "tokenizer.json")}
    s = result["splits"]
    return {"seq_len": result["seq_len"], "vocab_size": result["vocab_size"], "eos_id": result["eos_id"],
            "train_samples": s["train"]["n_samples"], "val_samples": s["val"]["n_samples"],
            "train_tokens": s["train"]["n_tokens"], "val_tokens": s["val"]["n_tokens"]}


def run(args: argparse.Namespace) -> int:
    from k2repro.config.load import load_config, load_params_file

    if args.params:
        cfg = load_params_file(args.params, args.overrides)
    else:
        cfg = load_config(args.overrides, args.config_name)
    from k2repro.data.engine import engine_from_config
    from k2repro.data.progress import enable_logging

    enable_logging()
    d = cfg.data
    work = Path(d.work_dir)
    engine = engine_from_config(d)
    stage = args.stage
    t0 = time.perf_counter()
    if stage == "prepare":
        from k2repro.data.prepare import prepare

        out = Path(args.out or work / "prepared")
        inputs = [args.inp] if args.inp else (list(d.inputs) or [d.source])
        result = prepare(inputs, out, text_field=d.text_field, fmt=d.format, val_fraction=d.val_fraction,
                         split_seed=d.split_seed, max_docs=d.max_docs, engine=engine,
                         id_field=d.id_field)
    elif stage == "dedup":
        from k2repro.data.dedup import DedupParams, dedup

        out = Path(args.out or work / "dedup")
        params = DedupParams(num_perm=d.dedup_num_perm, threshold=d.dedup_threshold, ngram=d.dedup_ngram,
                             bands=d.dedup_bands, rows=d.dedup_rows)
        result = dedup(args.inp or work / "prepared", out, params, engine=engine)
    elif stage == "tokenize":
        from k2repro.data.tokenizer import train_tokenizer, use_tokenizer

        out = Path(args.out or work / "tokenizer")
        if d.tokenizer:  # supplied: checked and copied, not trained
            result = use_tokenizer(d.tokenizer, out, model_vocab_size=cfg.model.vocab_size)
        else:
            result = train_tokenizer(args.inp or work / "dedup", out, vocab_size=d.vocab_size,
                                     min_frequency=d.min_frequency, engine=engine,
                                     train_mb=d.tokenizer_train_mb)
    elif stage == "pack":
        from k2repro.data.pack import pack

        out = Path(args.out or d.packed_dir)
        result = pack(args.inp or work / "dedup", args.tokenizer or work / "tokenizer", out, seq_len=cfg.train.seq_len,
                      engine=engine)
    else:  # argparse only lets the four stages through
        raise BadInputError(f"unknown stage {stage!r}")
    summary = {"stage": stage, "out": str(out), **_summary(stage, out, result),
               "seconds": round(time.perf_counter() - t0, 2)}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        detail = ", ".join(f"{k}={v}" for k, v in summary.items() if k not in ("stage", "out", "seconds"))
        print(f"data {stage}: {detail} -> {out} [{summary['seconds']} s]", flush=True)
    return 0
