"""Progress of a data stage: on a real terminal (a pty) one line redrawn in place with
documents/s, MB/s, percent and ETA, at most ~4 times a second; on a pipe or file the same as
`logging` lines plus a summary; nothing but counting when neither would be seen."""

from __future__ import annotations

import io
import logging
import os
import pty
import time

import pytest

from k2repro.data.progress import LOGGER, Progress, enable_logging


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            b = os.read(fd, 65536)
        except OSError:  # EIO once the slave side is closed
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks).decode()


def test_terminal_redraws_one_line_with_rates_percent_and_eta() -> None:
    master, slave = pty.openpty()
    try:
        stream = os.fdopen(slave, "w", closefd=True)
        assert stream.isatty()
        with Progress("pack", total_docs=400, total_bytes=400_000, stream=stream) as p:
            t_end = time.monotonic() + 0.8
            while p.docs < 400:
                p.update(1, 1000)
                time.sleep(max(t_end - time.monotonic(), 0) / max(400 - p.docs, 1))
        stream.close()
        out = _read_all(master)
    finally:
        os.close(master)
    out = out.replace("\r\n", "\n")  # the terminal's own newline translation
    frames = out.split("\r")[1:]
    assert 2 <= len(frames) <= 0.8 / 0.25 + 2, out  # redrawn, and not more than ~4 times a second
    mid = frames[0]
    for field in ("pack: ", "/400 docs", "docs/s", "MB/s", "%", "ETA 0:00:0"):
        assert field in mid, mid
    assert "\n" not in "".join(frames[:-1])  # one line, redrawn in place
    last = frames[-1]
    assert last.startswith("pack: done, 400 docs, 0.4 MB in ") and last.endswith("\n") and last.count("\n") == 1
    assert "docs/s" in last and "MB/s" in last


def test_log_lines_on_a_pipe(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()  # not a terminal
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    with Progress("dedup", total_docs=50, stream=stream, every=0.05) as p:
        for _ in range(50):
            p.update(1, 2_000_000)
            time.sleep(0.005)
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER.name]
    assert stream.getvalue() == ""  # nothing drawn: the log carries it
    assert len(msgs) >= 3 and p.lines == len(msgs)
    assert all("\r" not in m for m in msgs)
    assert "dedup: " in msgs[0] and "/50 docs" in msgs[0] and "docs/s" in msgs[0] and "MB/s" in msgs[0]
    assert "%" in msgs[0] and "ETA " in msgs[0]
    assert msgs[-1].startswith("dedup: done, 50 docs, 100.0 MB in ")


def test_unknown_totals_give_rates_without_percent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    p = Progress("prepare", stream=io.StringIO(), every=0.0)
    for _ in range(5):
        p.update(2, 10)
        time.sleep(0.03)
    f = p.fields()
    assert f["docs"] == 10 and f["percent"] is None and f["eta_s"] is None
    assert "ETA" not in p.line() and "docs/s" in p.line()
    p.close()
    assert caplog.records[-1].getMessage().startswith("prepare: done, 10 docs")


def test_failure_claims_no_done(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    with pytest.raises(RuntimeError), Progress("pack", stream=io.StringIO(), every=100) as p:
        p.update(1, 1)
        raise RuntimeError("boom")
    assert not [r for r in caplog.records if "done" in r.getMessage()]


def test_silent_when_nobody_would_see_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER.name)
    stream = io.StringIO()
    with Progress("pack", total_docs=10, stream=stream, every=0.0) as p:
        for _ in range(10):
            p.update(1, 1)
    assert p.docs == 10 and p.lines == 0 and stream.getvalue() == "" and not caplog.records


def test_wrap_counts_utf8_bytes_and_enable_logging_respects_an_explicit_level() -> None:
    p = Progress("tokenize", stream=io.StringIO())
    assert list(p.wrap(["ab", "é", b"xyz"])) == ["ab", "é", b"xyz"]
    assert (p.docs, p.nbytes) == (3, 2 + 2 + 3)
    old = LOGGER.level
    try:
        LOGGER.setLevel(logging.NOTSET)
        enable_logging({"K2REPRO_LOG_LEVEL": "ERROR"})
        assert LOGGER.level == logging.NOTSET
        enable_logging({})
        assert LOGGER.level == logging.INFO
    finally:
        LOGGER.setLevel(old)


def test_clock_is_read_in_strides_not_per_call() -> None:
    p = Progress("pack", stream=io.StringIO(), every=1000)
    for _ in range(200_000):
        p.update(1, 100)
    assert p._stride > 1 and p.docs == 200_000 and p.nbytes == 20_000_000


def test_parallel_tasks_log_lines_even_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    master, slave = pty.openpty()
    try:
        stream = os.fdopen(slave, "w", closefd=True)
        with Progress("dedup task 1/2", total_docs=3, stream=stream, redraw=False, every=0.0) as p:
            for _ in range(3):
                p.update(1, 10)
        stream.close()
        drawn = _read_all(master)
    finally:
        os.close(master)
    assert drawn == "" and not p.tty
    assert caplog.records[-1].getMessage().startswith("dedup task 1/2: done, 3 docs")
