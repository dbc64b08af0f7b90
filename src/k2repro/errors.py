"""User-facing errors with the exit codes of docs/architecture.md ("Exit codes")."""

from __future__ import annotations


class K2ReproError(Exception):
    """Base class: carries the process exit code the CLI returns."""

    exit_code = 2


class ConfigError(K2ReproError):
    """A config value broke a rule; the message names the key."""

    exit_code = 2


class BadInputError(K2ReproError):
    """Bad CLI argument, missing run, malformed file; the message names the culprit."""

    exit_code = 2


class CheckpointError(K2ReproError):
    """A checkpoint failed verification (missing or changed file)."""

    exit_code = 2


class VerificationFailed(K2ReproError):
    """A replay or verification ran but found a mismatch."""

    exit_code = 1


class GuardAbort(K2ReproError):
    """The spike guard aborted training."""

    exit_code = 3
