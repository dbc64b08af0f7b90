"""`k2repro data tokenize`: a byte-level BPE trained locally with HF `tokenizers`, or the
user's own `tokenizer.json` (`data.tokenizer=PATH`).

Trained on the deduplicated train split only, so validation text never shapes the
vocabulary. Byte-level means every input is encodable (no unknown token) and decoding is
lossless. Training is deterministic: the trainer breaks ties between equally frequent pairs
by the pair itself, so two runs (any thread count) write the same tokenizer.json.

BPE training is one process whose memory grows with the text it counts, so on a large corpus
it learns from a sample of at most `data.tokenizer_train_mb` MB of the train split: the
documents with the smallest salted hash of their id (salted apart from the train/validation
split's hash) whose texts fit in the bound together, read in shard order. A first pass over the
split finds the cut-off; the choice depends only on the document ids and sizes, so it is the
same on every run, executor and worker count, and it is spread evenly over every shard. When
dedup kept no more than the bound (the bundled corpus), there is no first pass, every train
document is used and the manifest is what it was before the bound existed; otherwise the
manifest's params record the bound and `sample` what was drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from k2repro.core.atomic import atomic_dir
from k2repro.core.hashing import sha256_file
from k2repro.data.workdir import artifact, read_manifest, rebase, relpath, write_json
from k2repro.errors import BadInputError, ConfigError

STAGE = "tokenize"
DEFAULT_TRAIN_MB = 256
SAMPLE_SALT = b"k2repro-tokenizer-sample\0"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
# End-of-document tokens of common public tokenizers, tried in this order on a supplied one
# (GPT-2/NeoX/Qwen, Llama-2/T5/Mistral, Llama-3, Gemma).
EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<eos>")


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


def eos_token(tokenizer, where: str = "tokenizer") -> str:  # noqa: ANN001
    """The end-of-document token pack appends after every document: ours, or the first of
    EOS_CANDIDATES that a supplied tokenizer has."""
    for t in EOS_CANDIDATES:
        if tokenizer.token_to_id(t) is not None:
            return t
    raise BadInputError(f"{where}: has no end-of-document token (none of {', '.join(EOS_CANDIDATES)})")


def eos_id(tokenizer) -> int:  # noqa: ANN001
    return int(tokenizer.token_to_id(eos_token(tokenizer)))


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
                    min_frequency: int = 2, engine=None, train_mb: float = DEFAULT_TRAIN_MB) -> dict:  # noqa: ANN001 - k2repro.data.engine.Engine
    """Train on dedup's train shards (at most `train_mb` MB of them, see the module doc) as one
    datatrove task (BPE training is one process), write `<out>/tokenizer.json` and
    `manifest.json`; returns the manifest."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"config key 'data.vocab_size': must be >= {MIN_VOCAB} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens) (got {vocab_size})")
    if min_frequency < 1:
        raise ConfigError(f"config key 'data.min_frequency': must be >= 1 (got {min_frequency})")
    if not train_mb > 0:
        raise ConfigError(f"config key 'data.tokenizer_train_mb': must be > 0 (got {train_mb})")
    from k2repro.data import engine as eng

    return eng.run_one_task(_train, engine, Path(out), Path(in_dir), Path(out), vocab_size, min_frequency,
                            float(train_mb))


def sample_key(doc_id: str) -> int:
    """A document's rank key for the tokenizer's training sample: 64 bits of a salted sha256
    of its id (salted, so the sample is independent of the train/validation split, which
    hashes the same ids)."""
    return int.from_bytes(hashlib.sha256(SAMPLE_SALT + doc_id.encode("utf-8")).digest()[:8], "big")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


class TrainSample:
    """The train documents BPE learns from: all of them when dedup kept at most `max_bytes`
    (`kept_bytes`, both splits, bounds the train split), else the documents with the
    smallest `sample_key` whose texts fit in `max_bytes` together (`plan` finds the cut-off
    in a first pass), in shard order. Counts what it yields."""

    def __init__(self, max_bytes: int, kept_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bounded = kept_bytes > max_bytes
        self.cutoff: int | None = None  # bounded: documents with sample_key <= cutoff are in
        self.docs = self.bytes = self.seen = 0
        self.planned_docs = 0

    def plan(self, docs: Iterator[dict]) -> None:
        """First pass (bounded only): take documents by increasing key while they fit."""
        import numpy as np

        keys, sizes = [], []
        for d in docs:
            keys.append(sample_key(d["doc_id"]))
            sizes.append(_utf8_len(d["text"]))
        k = np.array(keys, dtype=np.uint64)
        order = np.argsort(k, kind="stable")
        fits = np.cumsum(np.array(sizes, dtype=np.int64)[order]) <= self.max_bytes
        n = int(np.argmin(fits)) if not fits.all() else len(order)  # the first that does not fit
        self.planned_docs = n
        self.cutoff = int(k[order[n - 1]]) if n else -1

    def texts(self, docs: Iterator[dict], prog=None) -> Iterator[str]:  # noqa: ANN001 - a Progress
        """The sampled texts of `docs`; `prog` counts every document read (the stage's pace)."""
        for d in docs:
            self.seen += 1
            n = _utf8_len(d["text"])
            if prog is not None:
                prog.update(1, n)
            if self.bounded and (sample_key(d["doc_id"]) > self.cutoff or self.bytes + n > self.max_bytes):
                continue  # (the byte check only matters for equal keys, i.e. a repeated id)
            self.docs += 1
            self.bytes += n
            yield d["text"]

    def record(self, max_mb: float) -> dict:
        """What the manifest says of the sample (only when it is one)."""
        return {"max_mb": max_mb, "docs": self.docs, "bytes": self.bytes, "of_docs": self.seen,
                "method": "the train documents with the smallest sha256(salt, doc_id) whose texts fit in "
                          "max_mb together, in shard order"}


def _train(src: Path, out: Path, vocab_size: int, min_frequency: int, train_mb: float, engine) -> dict:  # noqa: ANN001
    from k2repro.data.engine import iter_shard, shards_of, write_execution
    from k2repro.data.progress import Progress

    upstream = read_manifest(src, "dedup")
    trained_on = [a for a in upstream["artifacts"] if a.get("split") == "train"]
    n_docs = sum(a["n_docs"] for a in trained_on)
    if not n_docs:
        raise BadInputError(f"{src}: no training documents to train the tokenizer on")
    sample = TrainSample(int(train_mb * 1e6), int(upstream["counts"]["kept_bytes"]))

    def docs() -> Iterator[dict]:
        return (d for p in shards_of(upstream, ["train"]) for d in iter_shard(src / p))

    if sample.bounded:
        sample.plan(docs())
    tok, trainer = build_trainer(vocab_size, min_frequency)
    with Progress(STAGE, total_docs=n_docs) as prog:
        tok.train_from_iterator(sample.texts(docs(), prog), trainer=trainer,
                                length=sample.planned_docs if sample.bounded else n_docs)
    params = {"vocab_size": vocab_size, "min_frequency": min_frequency, "model": "byte-level BPE",
              "special_tokens": list(SPECIAL_TOKENS)}
    manifest = {
        "stage": STAGE,
        # the bound is recorded when it chose a sample: a corpus within it trains as before
        "params": params | ({"train_mb": train_mb} if sample.bounded else {}),
        "vocab_size": tok.get_vocab_size(), "eos_token": EOS, "eos_id": eos_id(tok), "supplied": False,
        "inputs": rebase(trained_on, src, out),
        "artifacts": [],
        **({"sample": sample.record(train_mb)} if sample.bounded else {}),
    }
    with atomic_dir(out) as tmp:
        tok.save(str(tmp / TOKENIZER_FILE), pretty=True)
        manifest["artifacts"].append(artifact(tmp, TOKENIZER_FILE, "tokenizer/tokenizer.json"))
        manifest["sha256"] = manifest["artifacts"][0]["sha256"]
        write_json(tmp / "manifest.json", manifest)
        write_execution(tmp, engine, STAGE, [src])
    return manifest


def tokenizer_sha256(path: str | os.PathLike) -> str:
    p = Path(path)
    return sha256_file(p / TOKENIZER_FILE if p.is_dir() else p)


def supplied_tokenizer(path: str | os.PathLike):  # noqa: ANN201 - (tokenizers.Tokenizer, dict)
    """Load and check a user's tokenizer.json (or a folder holding one). Returns the tokenizer
    and `info`: path, sha256 (of the file's bytes), vocab_size (added tokens included: every
    id the model can emit), model type, EOS token and id. Anything that is not a tokenizer
    (missing, not UTF-8 JSON, JSON that `tokenizers` cannot load) is a BadInputError naming
    the file."""
    tok, info, _ = _read_supplied(path)
    return tok, info


def _read_supplied(path: str | os.PathLike):  # noqa: ANN202 - (Tokenizer, info, the bytes checked)
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{p}: data.tokenizer: no such file") from None
    except OSError as exc:
        raise BadInputError(f"{p}: data.tokenizer: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text)
    except UnicodeDecodeError:
        raise BadInputError(f"{p}: not a tokenizer (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{p}:{exc.lineno}: not a tokenizer (not valid JSON: {exc.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise BadInputError(f"{p}: not a tokenizer (JSON without a tokenizers 'model' object)")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a plain Exception
        raise BadInputError(f"{p}: not a tokenizer ({str(exc).splitlines()[0]})") from None
    eos = eos_token(tok, str(p))
    info = {"path": str(p), "sha256": hashlib.sha256(raw).hexdigest(), "vocab_size": tok.get_vocab_size(),
            "model": str(obj["model"].get("type", "unknown")), "eos_token": eos, "eos_id": tok.token_to_id(eos)}
    return tok, info, raw


def use_tokenizer(path: str | os.PathLike, out: str | os.PathLike, model_vocab_size: int) -> dict:
    """The tokenize stage with `data.tokenizer` set: check the file, refuse a vocabulary larger
    than `model.vocab_size` (ConfigError naming both keys), copy the bytes that were checked to
    `<out>/tokenizer.json` with a manifest (`supplied: true`, source, sha256, vocab size).
    Nothing is written unless every check passed. Returns the manifest."""
    _, info, raw = _read_supplied(path)
    if info["vocab_size"] > model_vocab_size:
        raise ConfigError(
            f"config key 'data.tokenizer': {info['path']} has {info['vocab_size']} tokens, more than "
            f"config key 'model.vocab_size' = {model_vocab_size} (raise model.vocab_size to >= {info['vocab_size']})")
    source = relpath(info["path"], out)  # like every manifest path: relative, no machine's root
    manifest = {
        "stage": STAGE, "supplied": True,
        "params": {"supplied": True, "model": info["model"], "source": source},
        "source": source, "sha256": info["sha256"],
        "vocab_size": info["vocab_size"], "eos_token": info["eos_token"], "eos_id": info["eos_id"],
        "inputs": [{"artifact": "tokenizer/supplied", "path": source, "sha256": info["sha256"],
                    "n_docs": 0, "n_tokens": 0}],
        "artifacts": [],
    }
    with atomic_dir(out) as tmp:
        (tmp / TOKENIZER_FILE).write_bytes(raw)
        manifest["artifacts"].append(artifact(tmp, TOKENIZER_FILE, "tokenizer/tokenizer.json"))
        write_json(tmp / "manifest.json", manifest)
    return manifest
