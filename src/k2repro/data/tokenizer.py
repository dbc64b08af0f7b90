"""`k2repro data tokenize`: a byte-level BPE trained locally with HF `tokenizers`.

Trained on the deduplicated train split only, so validation text never shapes the
vocabulary. Byte-level means every input is encodable (no unknown token) and decoding is
lossless. Training is deterministic: the trainer breaks ties between equally frequent pairs
by the pair itself, so two runs (any thread count) write the same tokenizer.json.
"""

from __future__ import annotations

import os
from pathlib import Path

from k2repro.core.atomic import atomic_dir
from k2repro.core.hashing import sha256_file
from k2repro.data.workdir import artifact, read_manifest, rebase, write_json
from k2repro.errors import BadInputError, ConfigError

STAGE = "tokenize"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def load_tokenizer(path: str | os.PathLike):  # noqa: ANN201 - tokenizers.Tokenizer, imported lazily
    """Load a tokenizer.json (or the tokenizer folder holding one)."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.exists():
        raise BadInputError(f"{p}: no tokenizer (run `k2repro data tokenize`)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
        raise BadInputError(f"{p}: not a tokenizer file ({str(exc).splitlines()[0]})") from None


def decode(tokenizer, ids) -> str:  # noqa: ANN001 - tokenizers.Tokenizer, any int sequence
    """Token ids -> text, special tokens included (an EOS shows where a document ended)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def eos_id(tokenizer) -> int:  # noqa: ANN001
    i = tokenizer.token_to_id(EOS)
    if i is None:
        raise BadInputError(f"tokenizer has no {EOS} token")
    return int(i)


def build_trainer(vocab_size: int, min_frequency: int):  # noqa: ANN201
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    return tok, trainer


def train_tokenizer(in_dir: str | os.PathLike, out: str | os.PathLike, vocab_size: int = 2048,
                    min_frequency: int = 2, engine=None) -> dict:  # noqa: ANN001 - k2repro.data.engine.Engine
    """Train on dedup's train shards as one datatrove task (BPE training is one process),
    write `<out>/tokenizer.json` and `manifest.json`; returns the manifest."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"config key 'data.vocab_size': must be >= {MIN_VOCAB} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens) (got {vocab_size})")
    if min_frequency < 1:
        raise ConfigError(f"config key 'data.min_frequency': must be >= 1 (got {min_frequency})")
    from k2repro.data import engine as eng

    return eng.run_one_task(_train, engine, Path(out), Path(in_dir), Path(out), vocab_size, min_frequency)


def _train(in_dir: Path, out: Path, vocab_size: int, min_frequency: int, engine) -> dict:  # noqa: ANN001
    from k2repro.data.engine import iter_shard, shards_of, write_execution

    src = in_dir
    upstream = read_manifest(src, "dedup")
    trained_on = [a for a in upstream["artifacts"] if a.get("split") == "train"]
    n_docs = sum(a["n_docs"] for a in trained_on)
    if not n_docs:
        raise BadInputError(f"{src}: no training documents to train the tokenizer on")
    tok, trainer = build_trainer(vocab_size, min_frequency)
    tok.train_from_iterator((d["text"] for p in shards_of(upstream, ["train"]) for d in iter_shard(src / p)),
                            trainer=trainer, length=n_docs)
    manifest = {
        "stage": STAGE,
        "params": {"vocab_size": vocab_size, "min_frequency": min_frequency, "model": "byte-level BPE",
                   "special_tokens": list(SPECIAL_TOKENS)},
        "vocab_size": tok.get_vocab_size(), "eos_token": EOS, "eos_id": eos_id(tok),
        "inputs": rebase(trained_on, src, out),
        "artifacts": [],
    }
    with atomic_dir(out) as tmp:
        tok.save(str(tmp / TOKENIZER_FILE), pretty=True)
        manifest["artifacts"].append(artifact(tmp, TOKENIZER_FILE, "tokenizer/tokenizer.json"))
        write_json(tmp / "manifest.json", manifest)
        write_execution(tmp, engine, STAGE, [src])
    return manifest


def tokenizer_sha256(path: str | os.PathLike) -> str:
    p = Path(path)
    return sha256_file(p / TOKENIZER_FILE if p.is_dir() else p)
