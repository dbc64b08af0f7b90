"""The data stages on about a gigabyte: prepare, dedup, tokenize, pack, each as its own
`python -m k2repro data <stage>` process, for three variants on the same corpus in the same
run:

- `inhouse`: the in-house stages of the release before issue 22 (commit a2ff341, its `src/`
  and `conf/` extracted with `git archive` into the work folder and run with PYTHONPATH);
- `new_w1`, `new_w2`: the current tree with `data.tasks` fixed (default 2) and
  `data.workers=1` / `2` (keys of the datatrove engine; `--engine-keys auto` passes them only
  when the tree's config has them, else one `new` variant runs without them).

Per stage and in total: wall time, MB/s (corpus text MB / seconds, the same basis for every
stage), peak memory (the largest single process's VmHWM, and the sum of RSS over the stage's
process tree polled from /proc every 0.1 s: the figure the 2 GB goal is about, since workers
run side by side), and dedup quality against the injected truth.

The corpus is built here, without network, from text files already on this machine: Python
sources and docs of the interpreter's stdlib and site-packages, /usr/share/doc and
/usr/include (files of 64 B - 512 KB, at least 50 words, valid UTF-8, one document per file;
exact duplicates among them dropped by a whitespace- and case-folded hash). A seeded random
subset is taken; when the machine has too little, "mosaic" documents (paragraphs of random
files, recombined) fill the rest. Then known duplicates are injected: exact copies of a
fraction of the documents, and near copies of another fraction (a few word edits, exact word
5-gram Jaccard >= 0.85 with the original, computed here). Truth is kept outside the corpus
folder. Dedup quality per variant: recall of the injected copies (exact, near), groups where
every member was removed (over-removal), documents removed outside the injected groups
(natural duplicates among the machine's files: equal across variants when quality is equal),
and whether the kept document set equals the in-house one. A group with every member removed
is not necessarily an error (its text may also be a natural duplicate of a file kept
elsewhere); recall counts at most `size - 1` removals per group.

Goals (issue 22): peak <= 2 GB; new engine at 2 workers no slower in total than in-house;
same dedup quality. Writes reports/bench/data_scale.json (`--out-name` to change).

    .venv/bin/python bench/data_scale.py                 # ~1 GB: run quietly, it takes long
    .venv/bin/python bench/data_scale.py --size-mb 20    # a dry run
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, write  # noqa: E402

BASELINE_COMMIT = "a2ff341"
STAGES = ("prepare", "dedup", "tokenize", "pack")
TEXT_SUFFIXES = frozenset(
    ".py .pyi .pyx .pxd .c .h .cc .cpp .hpp .cu .cuh .rs .js .ts .sh .txt .md .rst .html .css .tex "
    ".json .yaml .yml .toml .cfg .ini .xml .csv".split())
CODE_SUFFIXES = frozenset(".py .pyi .pyx .pxd .c .h .cc .cpp .hpp .cu .cuh .rs .js .ts .sh".split())
MIN_FILE, MAX_FILE, MIN_WORDS = 64, 512 * 1024, 50
SHARD_BYTES = 32 * 10**6
NGRAM = 5  # the dedup's shingles
_WS = re.compile(r"(\s+)")


# ---- corpus -----------------------------------------------------------------------------
def default_sources() -> list[tuple[str, Path]]:
    """(label, folder): where text lives on any Debian-like machine with Python."""
    paths = sysconfig.get_paths()
    cands = [("python-purelib", paths["purelib"]), ("python-stdlib", paths["stdlib"]),
             ("usr-share-doc", "/usr/share/doc"), ("usr-include", "/usr/include")]
    out, seen = [], set()
    for label, p in cands:
        r = Path(p).resolve()
        if r.is_dir() and r not in seen:
            seen.add(r)
            out.append((label, r))
    return out


def candidate_files(sources: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Text files by suffix and size, each real file once (symlinks and repeats skipped)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for label, root in sources:
        for dirpath, dirnames, filenames in os.walk(root):
            # the stdlib folder may hold an interpreter-wide site-packages: copies of (other
            # versions of) what purelib holds, i.e. natural near duplicates outside the truth
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if p.suffix.lower() not in TEXT_SUFFIXES or p.is_symlink():
                    continue
                try:
                    st = p.stat()
                except OSError:
                    continue
                if MIN_FILE <= st.st_size <= MAX_FILE and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    out.append((label, p))
    return out


def _read_text(p: Path) -> str | None:
    try:
        t = p.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return t if "\x00" not in t and len(t.split()) >= MIN_WORDS else None


def near_copy(rng: random.Random, text: str, min_jaccard: float = 0.85) -> tuple[str, float] | None:
    """The text with a few word edits (replace, insert, delete; whitespace kept), exact
    5-gram Jaccard >= min_jaccard with the original, or None if none could be made."""
    from k2repro.data.dedup_eval import jaccard

    parts = _WS.split(text)
    word_at = [i for i in range(0, len(parts), 2) if parts[i]]
    if len(word_at) < 200:
        return None
    pool = [parts[i] for i in word_at]
    for n_edits in range(max(1, len(word_at) // 110), 0, -1):
        out = list(parts)
        for k in rng.sample(word_at, n_edits):
            op = rng.randrange(3)
            out[k] = rng.choice(pool) if op == 0 else (out[k] + " " + rng.choice(pool) if op == 1 else "")
        cand = "".join(out)
        if cand != text:
            j = jaccard(text, cand, NGRAM)
            if j >= min_jaccard:
                return cand, j
    return None


def build_corpus(out: Path, size_mb: float, seed: int = 0, exact_frac: float = 0.05, near_frac: float = 0.05,
                 sources: list[tuple[str, Path]] | None = None) -> dict:
    """Write `<out>/part-NNNNN.jsonl` (`id`, `domain`, `text`) of about size_mb MB of text and
    return the truth and the corpus facts (see the module doc)."""
    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    base_target = target / (1 + exact_frac + near_frac)
    cands = candidate_files(default_sources() if sources is None else sources)
    order = list(range(len(cands)))
    rng.shuffle(order)
    base: list[tuple[str, str, str]] = []  # (id, domain, text)
    folded: set[bytes] = set()
    nbytes, by_source = 0, {}
    for k in order:
        if nbytes >= base_target:
            break
        label, p = cands[k]
        t = _read_text(p)
        if t is None:
            continue
        h = hashlib.blake2b(" ".join(t.lower().split()).encode(), digest_size=16).digest()
        if h in folded:
            continue
        folded.add(h)
        base.append((f"b{len(base):07d}", "code" if p.suffix.lower() in CODE_SUFFIXES else "prose", t))
        nbytes += len(t.encode("utf-8"))
        by_source[label] = by_source.get(label, 0) + 1
    n_files = len(base)
    paragraphs = [para for _, _, t in base for para in t.split("\n\n") if len(para) > 40]
    while nbytes < base_target and paragraphs:  # too little text on this machine: recombine
        t = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(8, 30)))
        base.append((f"m{len(base):07d}", "prose", t))
        nbytes += len(t.encode("utf-8"))
    docs = list(base)
    groups: list[dict] = []
    pick = rng.sample(range(len(base)), k=len(base))
    n_exact = int(round(exact_frac * len(base)))
    for i in pick[:n_exact]:
        bid, dom, t = base[i]
        docs.append((f"e{i:07d}", dom, t))
        groups.append({"kind": "exact", "ids": [bid, f"e{i:07d}"]})
    want_near, jac = int(round(near_frac * len(base))), []
    for i in pick[n_exact:]:
        if len(jac) >= want_near:
            break
        bid, dom, t = base[i]
        made = near_copy(rng, t)
        if made:
            docs.append((f"n{i:07d}", dom, made[0]))
            groups.append({"kind": "near", "ids": [bid, f"n{i:07d}"], "jaccard": round(made[1], 4)})
            jac.append(made[1])
    rng.shuffle(docs)
    out.mkdir(parents=True, exist_ok=True)
    shard, size, total = 0, 0, 0
    f = open(out / f"part-{shard:05d}.jsonl", "w", encoding="utf-8")
    for did, dom, t in docs:
        line = json.dumps({"id": did, "domain": dom, "text": t}, ensure_ascii=False) + "\n"
        if size and size + len(line) > SHARD_BYTES:
            f.close()
            shard, size = shard + 1, 0
            f = open(out / f"part-{shard:05d}.jsonl", "w", encoding="utf-8")
        f.write(line)
        size += len(line)
        total += len(t.encode("utf-8"))
    f.close()
    return {
        "docs": len(docs), "text_mb": round(total / 1e6, 2),
        "jsonl_mb": round(sum(p.stat().st_size for p in out.glob("*.jsonl")) / 1e6, 2), "shards": shard + 1,
        "base_docs_from_files": n_files, "base_docs_mosaic": len(base) - n_files, "files_by_source": by_source,
        "candidate_files": len(cands), "exact_copies": n_exact, "near_copies": len(jac),
        "near_jaccard_min": round(min(jac), 4) if jac else None,
        "near_jaccard_median": round(sorted(jac)[len(jac) // 2], 4) if jac else None,
        "seed": seed, "exact_frac": exact_frac, "near_frac": near_frac,
        "groups": groups, "all_ids": sorted(d[0] for d in docs),
    }


# ---- running the stages -----------------------------------------------------------------
def extract_baseline(commit: str, dest: Path) -> Path:
    """`src/` and `conf/` of `commit`, as that release ran them."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src", "conf"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(dest, filter="data")
    return dest


def has_engine_keys(src: Path) -> bool:
    code = "from k2repro.config.schema import DataConfig as D; print(all(k in D.__dataclass_fields__ for k in ('tasks', 'workers')))"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(src)},
                       capture_output=True, text=True, check=True)
    return r.stdout.strip() == "True"


def _hwm(pid: int) -> int:
    """A process's peak RSS since its exec (VmHWM), in bytes; 0 once it is gone. Not wait4's
    ru_maxrss: Linux carries the parent's high-water mark across the fork + exec into it, so
    every stage would report at least the bench's own size."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _tree_mem(pid: int, cpu: dict[int, float] | None = None) -> tuple[int, int]:
    """(sum of the current RSS, largest VmHWM) over the process and its descendants; with
    `cpu`, also the latest user + system CPU seconds of each of them (by pid)."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total, hwm = 0, 0
    for q in procs:
        try:
            total += q.memory_info().rss
            if cpu is not None:
                t = q.cpu_times()
                cpu[q.pid] = max(cpu.get(q.pid, 0.0), t.user + t.system)
        except psutil.Error:
            continue
        hwm = max(hwm, _hwm(q.pid))
    return total, hwm


def run_stage(src: Path, conf: Path, cwd: Path, stage: str, overrides: list[str], log: Path) -> dict:
    """One stage as its own process: wall time, the peak RSS of its largest process (VmHWM),
    the peak of the whole process tree's RSS (polled every 0.1 s, so a spike shorter
    than that can be missed), and the tree's CPU seconds (each process's own user + system
    time as last polled, so up to 0.1 s of each is missed; children's times are not added
    twice). CPU seconds say how much work a stage did even when other work on a shared machine
    stretches its wall time."""
    env = {**os.environ, "PYTHONPATH": str(src), "K2REPRO_CONF": str(conf), "OMP_NUM_THREADS": "1",
           "K2REPRO_PROGRESS_EVERY": "30"}
    with open(log, "a", encoding="utf-8") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "k2repro", "data", stage, *overrides, "--json"], cwd=cwd,
                                env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        peak = [0, 0]
        cpu: dict[int, float] = {}
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                total, hwm = _tree_mem(proc.pid, cpu)
                peak[0], peak[1] = max(peak[0], total), max(peak[1], hwm)
                done.wait(0.1)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        out = proc.stdout.read()
        proc.wait()
        secs = time.perf_counter() - t0
        done.set()
        th.join()
        cpu_s = sum(cpu.values())
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"data_scale: {stage} failed (exit {proc.returncode}): " + " | ".join(tail))
    return {"seconds": round(secs, 2), "cpu_s": round(cpu_s, 2), "peak_rss_mb": round(peak[1] / 2**20, 1),
            "peak_tree_rss_mb": round(peak[0] / 2**20, 1), "summary": json.loads(out.strip().splitlines()[-1])}


def kept_ids(packed: Path) -> set[str]:
    """Document ids in the packed folder (train + val), as the corpus's `id` field."""
    import pyarrow.parquet as pq

    out = set()
    for s in ("train", "val"):
        for did in pq.read_table(packed / f"{s}.docs.parquet", columns=["doc_id"]).column("doc_id").to_pylist():
            out.add(str(did).rsplit(":", 1)[-1])
    return out


def removed_map(dedup_dir: Path) -> dict[str, tuple[str, float]]:
    """removed.jsonl of a dedup stage (in-house and engine write the same fields): removed id ->
    (the id of the document kept in its place, their Jaccard), ids as the corpus's `id` field."""
    out = {}
    with open(dedup_dir / "removed.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out[str(r["doc_id"]).rsplit(":", 1)[-1]] = (str(r["kept"]).rsplit(":", 1)[-1], float(r["jaccard"]))
    return out


def quality(truth: dict, kept: set[str], replaced: dict[str, tuple[str, float]] | None = None) -> dict:
    """Dedup against the injected truth (see the module doc). With `removed` (removed.jsonl):
    where the text of each group with every member removed went. Dedup keeps one document per
    cluster, so such a group's text survives as another document (a natural duplicate of it
    elsewhere in the machine's files) unless that one is gone too. `replaced` maps a removed id
    to its kept document and their Jaccard: `groups_text_lost` counts
    groups none of whose members' kept documents is in the output, and `min_jaccard_to_kept`
    is the smallest similarity (verified by the stage) between a member and its kept document."""
    all_ids = set(truth["all_ids"])
    removed = all_ids - kept
    in_groups: set[str] = set()
    res: dict = {"kept_docs": len(kept & all_ids), "removed_docs": len(removed),
                 "unknown_kept_ids": len(kept - all_ids)}
    hit_total = 0
    for kind in ("exact", "near"):
        gs = [g for g in truth["groups"] if g["kind"] == kind]
        want = sum(len(g["ids"]) - 1 for g in gs)
        hit = sum(min(len(g["ids"]) - len(set(g["ids"]) & kept), len(g["ids"]) - 1) for g in gs)
        hit_total += hit
        in_groups.update(i for g in gs for i in g["ids"])
        res[f"{kind}_recall"] = round(hit / want, 4) if want else 1.0
        gone = [g for g in gs if not (set(g["ids"]) & kept)]
        res[f"{kind}_groups_all_removed"] = len(gone)
        if replaced is not None:
            reps = [[replaced[i] for i in g["ids"] if i in replaced] for g in gone]
            res[f"{kind}_groups_all_removed_text_kept"] = sum(any(k in kept for k, _ in r) for r in reps)
            res[f"{kind}_groups_text_lost"] = sum(not any(k in kept for k, _ in r) for r in reps)
            res[f"{kind}_groups_all_removed_min_jaccard_to_kept"] = min(
                (j for r in reps for _, j in r), default=None)
    res["removed_outside_injected"] = len(removed - in_groups)
    res["injected_share_of_removed"] = round(hit_total / len(removed), 4) if removed else 1.0
    return res


def run_variant(name: str, src: Path, conf: Path, corpus: Path, work: Path, extra: list[str], mb: float,
                truth: dict) -> tuple[dict, set[str]]:
    w = work / name
    w.mkdir(parents=True)
    log = work / f"{name}.stderr.log"
    # paths relative to the work folder (the stages run there): no machine path in the report
    common = ["--config-name", "pipeline", f"data.source={os.path.relpath(corpus, work)}", f"data.work_dir={name}",
              f"data.packed_dir={name}/packed", *extra]
    stages = {}
    for stage in STAGES:
        r = run_stage(src, conf, work, stage, common, log)
        r["mb_per_s"] = round(mb / r["seconds"], 2)
        stages[stage] = r
        print(f"data_scale: {name} {stage}: {r['seconds']} s ({r['cpu_s']} cpu-s), {r['mb_per_s']} MB/s, "
              f"peak {r['peak_tree_rss_mb']} MB", file=sys.stderr, flush=True)
    kept = kept_ids(w / "packed")
    replaced = removed_map(w / "dedup")
    total_s = sum(s["seconds"] for s in stages.values())
    res = {"overrides": extra, "stages": stages,
           "total": {"seconds": round(total_s, 2), "mb_per_s": round(mb / total_s, 2),
                     "cpu_s": round(sum(s["cpu_s"] for s in stages.values()), 2),
                     "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
                     "peak_tree_rss_mb": max(s["peak_tree_rss_mb"] for s in stages.values())},
           "dedup_quality": quality(truth, kept, replaced)}
    return res, kept


def progress_ns_per_call(n: int = 1_000_000) -> float:
    """Cost of Progress.update (the per-document call of the stages), loop overhead removed."""
    from k2repro.data.progress import Progress

    p = Progress("bench", total_docs=n, stream=io.StringIO(), every=3600)
    u = p.update
    t0 = time.perf_counter()
    for _ in range(n):
        u(1, 100)
    t = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    return round((t - (time.perf_counter() - t0)) / n * 1e9, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="corpus text size (default 1024)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact-frac", type=float, default=0.05, help="exact copies injected, fraction of documents")
    ap.add_argument("--near-frac", type=float, default=0.05, help="near copies injected, fraction of documents")
    ap.add_argument("--tasks", type=int, default=2, help="data.tasks of the new engine (fixed for both worker counts)")
    ap.add_argument("--engine-keys", choices=("auto", "on", "off"), default="auto",
                    help="pass data.tasks/data.workers/data.executor to the current tree (auto: if its config has them)")
    ap.add_argument("--variants", default="inhouse,new", help="inhouse and/or new (new: 1 and 2 workers)")
    ap.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    ap.add_argument("--new-tree", type=Path, default=REPO,
                    help="checkout whose src/ and conf/ are the new engine (default: this one)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out-name", default="data_scale", help="reports/bench/<name>.json")
    ap.add_argument("--label", default="", help="free text recorded as `label` (e.g. which tree --new-tree is)")
    args = ap.parse_args()
    variants = {v.strip() for v in args.variants.split(",") if v.strip()}
    work = args.work or Path(tempfile.mkdtemp(prefix="k2-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        truth = build_corpus(work / "corpus", args.size_mb, args.seed, args.exact_frac, args.near_frac)
        corpus_s = time.perf_counter() - t0
        mb = truth["text_mb"]
        print(f"data_scale: corpus {mb} MB text, {truth['docs']} docs in {corpus_s:.1f} s", file=sys.stderr, flush=True)
        results: dict = {}
        kept: dict[str, set[str]] = {}
        if "inhouse" in variants:
            base = extract_baseline(args.baseline_commit, work / "baseline")
            results["inhouse"], kept["inhouse"] = run_variant(
                "inhouse", base / "src", base / "conf", work / "corpus", work, [], mb, truth)
            shutil.rmtree(work / "inhouse")
        tree = args.new_tree.resolve()
        engine = {"auto": has_engine_keys(tree / "src"), "on": True, "off": False}[args.engine_keys]
        if "new" in variants:
            runs = ([(f"new_w{n}", [f"data.tasks={args.tasks}", f"data.workers={n}", "data.executor=local"])
                     for n in (1, 2)] if engine else [("new", [])])
            for name, extra in runs:
                results[name], kept[name] = run_variant(name, tree / "src", tree / "conf", work / "corpus", work,
                                                        extra, mb, truth)
                shutil.rmtree(work / name)
        for name in results:
            if "inhouse" in kept and name != "inhouse":
                diff = kept[name] ^ kept["inhouse"]
                results[name]["dedup_quality"]["kept_set_differs_from_inhouse_by"] = len(diff)
        goals: dict = {"peak_tree_rss_mb_limit": 2048}
        for name, r in results.items():
            goals[f"{name}_peak_within_2gb"] = r["total"]["peak_tree_rss_mb"] <= 2048
        if "inhouse" in results and "new_w2" in results:
            ratio = results["inhouse"]["total"]["seconds"] / results["new_w2"]["total"]["seconds"]
            goals["new_w2_speedup_vs_inhouse"] = round(ratio, 3)
            goals["new_w2_no_slower_than_inhouse"] = ratio >= 1.0
            qi, qn = results["inhouse"]["dedup_quality"], results["new_w2"]["dedup_quality"]
            goals["same_dedup_quality"] = all(qn[k] >= qi[k] for k in ("exact_recall", "near_recall")) and \
                qn["exact_groups_text_lost"] + qn["near_groups_text_lost"] <= \
                qi["exact_groups_text_lost"] + qi["near_groups_text_lost"] and \
                qn["removed_docs"] == qi["removed_docs"]
            # the first criterion used (kept for comparison): every member of fewer groups removed
            goals["no_more_groups_all_removed"] = qn["exact_groups_all_removed"] + qn["near_groups_all_removed"] <= \
                qi["exact_groups_all_removed"] + qi["near_groups_all_removed"]
        corpus = {k: v for k, v in truth.items() if k not in ("groups", "all_ids")}
        write(args.out_name, {
            "what": "k2repro data prepare, dedup, tokenize, pack on one corpus: the in-house stages of "
                    f"{args.baseline_commit} vs the current tree's engine at data.tasks={args.tasks} with 1 and 2 workers",
            "how_corpus": "text files on this machine (Python stdlib and site-packages sources/docs, /usr/share/doc, "
                          "/usr/include; one document per file, exact duplicates dropped; mosaic documents of "
                          "recombined paragraphs if short), seeded subset, then injected exact and near copies "
                          "(word edits, exact 5-gram Jaccard >= 0.85) whose (original, copy) groups are the truth; "
                          "no network",
            "new_tree_is_this_checkout": tree == REPO.resolve(), "label": args.label,
            "how_measured": "each stage its own process; seconds wall; cpu_s = user + system CPU seconds of the "
                            "stage's process tree (each process's own, as last polled every 0.1 s); MB/s = corpus text MB / seconds; peak_rss_mb = "
                            "largest single process (VmHWM, polled); peak_tree_rss_mb = polled sum over the stage's "
                            "process tree (0.1 s)",
            "goal": "peak_tree_rss_mb <= 2048; new_w2 total seconds <= inhouse; dedup quality equal",
            "size_mb_requested": args.size_mb, "corpus": corpus, "corpus_build_s": round(corpus_s, 1),
            "engine_keys": engine, "variants": results, "goals": goals,
            "progress_update_ns_per_call": progress_ns_per_call(),
            "bench_wall_s": round(time.perf_counter() - t_all, 1),
        })
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
