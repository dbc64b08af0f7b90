"""`python -m k2repro.train.launch [torchrun args]`: torchrun, minus its traceback on a signal.

torchrun forwards SIGINT/SIGTERM to the workers (each in its own session), waits
`--shutdown-timeout` seconds for them, then re-raises the signal as a `SignalException`
whose traceback (one per agent layer) is all a user would see of a clean Ctrl-C. The ranks
say what happened themselves (one line, the run's status `interrupted`), so here the signal
becomes the shell's exit status 128+N and nothing else.
"""

from __future__ import annotations

import glob
import logging
import sys

from k2repro.train.launchenv import LaunchEnv


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv`; a signal ends it with 128 + the signal number, quietly."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    # "Received SIGINT death signal, shutting down workers" and the error-file notice: the
    # ranks' own line says it better. Real failures still log at ERROR.
    for name in ("torch.distributed.elastic.agent.server.api",
                 "torch.distributed.elastic.multiprocessing.errors",
                 "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun(list(sys.argv[1:] if argv is None else argv))
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        # Ranks that stopped through k2repro's own error path (a bad input: exit 2, its one-line
        # message already printed) left an exit file; torchrun's failure table adds nothing.
        # A rank that crashed left none: then torchrun's report (and traceback) is the news.
        exit_file = LaunchEnv.from_environ().exit_file
        handled = {int(f.rsplit(".", 1)[1]) for f in glob.glob(f"{exit_file}.*")} if exit_file else set()
        if exc.failures and set(exc.failures) <= handled:
            return max(int(f.exitcode) for f in exc.failures.values())
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
