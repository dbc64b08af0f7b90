"""The causal check of `k2repro forensics RUN --replay` (issue 6, item 6): replay the onset
window from the checkpoint before it twice (differences: nondeterminism or hardware), and once
with the top suspect samples masked out (spike gone: data; spike stays: optimizer state).

Not implemented in this version: it needs the replay tool (`k2repro.tools.replay`). The hook
is here so that the CLI and the report have one place to call.
"""

from __future__ import annotations

import os
from typing import Any

from k2repro.errors import BadInputError


def causal_check(store: str | os.PathLike, result: Any, spike: Any) -> dict[str, Any]:
    """Return `{"replay_equal": bool, "spike_without_suspects": bool, "verdict": str}` for
    one spike. Raises BadInputError while the replay tool is missing."""
    try:
        import k2repro.tools.replay  # noqa: F401
    except ImportError:
        raise BadInputError("--replay: the replay tool (k2repro.tools.replay) is not "
                            "available in this build") from None
    raise BadInputError("--replay: the causal check is not implemented yet")
