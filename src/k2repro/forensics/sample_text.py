"""The text and features of the samples that data attribution ranks.

A spike blamed on data is only useful with the data in front of you: the run's packed dataset
(found from --data-dir, the run's hparams or its data manifest, and checked against the
manifest's sha256) gives each ranked sample's text, document ids and token/text features, and
the batch's typical features to compare them with. A sample that an injected fault replaced is
shown as the tokens the model trained on, regenerated from the fault's event. Separate from
attribution: only this module reads the packed data and the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from k2repro.errors import BadInputError
from k2repro.forensics.attribute import DataAttribution
from k2repro.forensics.source import RunSource
from k2repro.forensics.textfeat import feature_flags, text_features, token_features

if TYPE_CHECKING:
    from k2repro.forensics.analyze import ForensicsParams


class TextContext:
    """Sample text, document ids and features from the run's packed data, if it can be found."""

    def __init__(self, src: RunSource, p: ForensicsParams, faults: list[dict]) -> None:
        self.p = p
        self.notes: list[str] = []
        self._sample_text = None
        self._tokenizer: Any = None
        self._hp = src.hparams()
        # samples a recorded fault replaced: (step, sample id) -> (batch position, data position, kind)
        self._replaced = _replaced_samples(faults)
        self.ds, self.dir, tried = _find_packed(src, p, self._hp)
        if self.ds is None:
            why = "; ".join(tried) if tried else "the run records no packed data directory"
            self.notes.append(f"sample text and features: packed data not found ({why}); "
                              "pass --data-dir")
            return
        try:
            from k2repro.data.pack import sample_text

            self._sample_text = sample_text
        except ImportError:
            self.notes.append("sample text: k2repro.data.pack.sample_text is not available; "
                              "features are computed on token ids only")

    def _docs(self, sid: int) -> list[dict] | None:
        """[{doc_id, domain, snippet, ...}] of the sample, or None without a tokenizer."""
        if self._sample_text is None:
            return None
        try:
            return list(self._sample_text(self.dir, self.p.split, int(sid)))
        except Exception as exc:  # noqa: BLE001 - text is a courtesy; report once and go on
            self.notes.append(f"sample text: {type(exc).__name__}: {exc}; features are computed "
                              "on token ids only")
            self._sample_text = None
            return None

    def trained_tokens(self, sid: int, step: int | None) -> np.ndarray | None:
        """The tokens the model trained on in place of sample `sid` at `step` when a recorded
        fault replaced it (None: it trained on the packed sample). Regenerated from the fault's
        event and the run's seed as the trainer made them (train/faults.py)."""
        hit = self._replaced.get((int(step), int(sid))) if step is not None else None
        if hit is None or self.ds is None:
            return None
        seed = self._hp.get("train.seed")
        if seed is None:
            self.notes.append("sample text: the run records no train.seed; a replaced sample is shown as packed")
            self._replaced.clear()
            return None
        from k2repro.train.faults import degenerate_sample

        position, data_position, kind = hit
        seq_len = int(self._hp.get("train.seq_len") or self.ds.seq_len)
        return degenerate_sample(int(seed), data_position, position, seq_len + 1, self.ds.vocab_size, kind)

    def _decode(self, toks: np.ndarray) -> str | None:
        if self._sample_text is None:
            return None
        try:
            if self._tokenizer is None:
                from k2repro.data.pack import tokenizer_path
                from k2repro.data.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(tokenizer_path(self.dir or ""))
            from k2repro.data.tokenizer import decode

            return decode(self._tokenizer, toks).strip("\ufffd")
        except Exception as exc:  # noqa: BLE001 - text is a courtesy; report once and go on
            self.notes.append(f"sample text: {type(exc).__name__}: {exc}; features are computed on token ids only")
            self._sample_text = None
            return None

    def features(self, sid: int, with_text: bool, step: int | None = None) -> tuple[dict, str | None, list[str]]:
        assert self.ds is not None
        if not 0 <= sid < len(self.ds):
            return {}, None, []
        replaced = self.trained_tokens(sid, step)
        if replaced is not None:  # what the model saw, not the packed sample the fault displaced
            f = token_features(replaced)
            text = self._decode(replaced) if with_text else None
            if text is not None:
                f.update(text_features(text))
            return f, text, self.ds.docs_of(sid) if with_text else []
        toks = self.ds.get([sid])[0]
        f = token_features(toks)
        docs = self._docs(sid) if with_text else None
        if docs is None:
            return f, None, self.ds.docs_of(sid) if with_text else []
        text = "\n".join(str(d.get("snippet", "")) for d in docs)
        f.update(text_features(text))
        return f, text, [str(d.get("doc_id")) for d in docs]

    def enrich(self, data: DataAttribution, ss: Any) -> None:
        if self.ds is None or data.step is None:
            return
        step_ids = [int(s) for s in ss.loc[ss["step"] == data.step, "sample_id"]]
        # the batch's typical features: the median over its samples (64 of them at most)
        pick = step_ids
        if len(pick) > 64:
            pick = [pick[i] for i in np.linspace(0, len(pick) - 1, 64).astype(int)]
        feats = [self.features(s, with_text=self._sample_text is not None, step=data.step)[0] for s in pick]
        med: dict[str, float] = {}
        for k in {k for f in feats for k in f}:
            vals = [f[k] for f in feats if k in f and f[k] is not None and np.isfinite(f[k])]
            if vals:
                med[k] = round(float(np.median(vals)), 4)
        data.batch_feature_median = med
        for s in data.samples:
            f, text, docs = self.features(s["sample_id"], with_text=True, step=data.step)
            if self.trained_tokens(s["sample_id"], data.step) is not None:
                s["replaced"] = True  # text and features are of the fault's tokens
            s["features"] = f
            s["flags"] = feature_flags(f, med)
            s["doc_ids"] = docs
            if text is not None:
                s["text"] = text[: self.p.text_chars]


def _replaced_samples(faults: list[dict]) -> dict[tuple[int, int], tuple[int, int, str]]:
    """(step, sample id) -> (batch position, data position, kind) of every sample that a
    recorded bad_batch fault replaced."""
    out: dict[tuple[int, int], tuple[int, int, str]] = {}
    for f in faults:
        d = f.get("detail") or {}
        if d.get("kind") != "bad_batch" or d.get("data_position") is None or f.get("step") is None:
            continue
        for sid, pos in zip(d.get("sample_ids") or [], d.get("positions") or [], strict=False):
            out[(int(f["step"]), int(sid))] = (int(pos), int(d["data_position"]),
                                               str(d.get("bad_batch_kind") or "random"))
    return out


def _find_packed(src: RunSource, p: ForensicsParams, hp: dict[str, Any]) -> tuple[Any, str | None, list[str]]:
    """(dataset, its folder, why each other candidate was refused): the first of --data-dir,
    the run's `data.packed_dir` and its data manifest's folders whose packed split matches the
    manifest's sha256 (dataset None when none does)."""
    cands: list[tuple[str, str]] = []
    if p.data_dir:
        cands.append((p.data_dir, "--data-dir"))
    if hp.get("data.packed_dir"):
        cands.append((str(hp["data.packed_dir"]), "hparams data.packed_dir"))
    manifest = src.manifest()
    for m in manifest:
        if str(m.get("artifact", "")).startswith("packed/") and m.get("path"):
            cands.append((str(Path(str(m["path"])).parent), "data_manifest"))
    want = {str(m.get("artifact")): m.get("sha256") for m in manifest}
    from k2repro.data.packed import PackedDataset

    tried = []
    for path, why in cands:
        if not (Path(path) / "manifest.json").exists():
            tried.append(f"{path} ({why}): no manifest.json")
            continue
        try:
            ds = PackedDataset(path, p.split)
        except BadInputError as exc:
            tried.append(f"{path} ({why}): {exc}")
            continue
        mine = {a.get("artifact"): a.get("sha256") for a in ds.artifacts()}
        key = f"packed/{p.split}.bin"
        if want.get(key) and mine.get(key) and want[key] != mine[key]:
            tried.append(f"{path} ({why}): sha256 of {key} differs from the run's data_manifest")
            continue
        return ds, path, tried
    return None, None, tried


__all__ = ["TextContext"]
