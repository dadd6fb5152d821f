"""User-facing exception types and cifarcam's exit codes; the CLI prints an error as one line,
an optional hint, and exits with its code."""

EXIT_RUNTIME = 1  # a run, file or data set is missing, corrupt or locked; training diverged
EXIT_USAGE = 2  # bad options, config values or names
EXIT_SIGINT = 130  # stopped by Ctrl-C (128 + SIGINT); 143 for SIGTERM (128 + SIGTERM)


class CifarcamError(Exception):
    """An expected failure: a message for the user, an optional `hint` on what to do next."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CifarcamError):
    """Bad options, config values or names given by the user (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A config value failed validation."""


class DataError(CifarcamError):
    """A dataset could not be found, downloaded or decoded."""


class RunError(CifarcamError):
    """The run directory is missing something or refuses the operation."""


class CheckpointError(CifarcamError):
    """A checkpoint file is missing, corrupt or does not match the model."""


class TrainingDiverged(CifarcamError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(CifarcamError):
    """Training stopped on SIGINT/SIGTERM (exit 130 or 143, given as `exit_code`)."""


class RunLocked(RunError):
    """Another process holds this run: it trains it, or reads it while `train --overwrite` would
    delete it."""


class PeerFailed(CifarcamError):
    """Another rank of a torchrun training failed and printed why; this rank exits with its code
    and prints nothing, so the reason appears once."""

    def __init__(self, rank: int, exit_code: int) -> None:
        super().__init__(f"rank {rank} failed", exit_code=exit_code)
        self.rank = rank


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM during training: it stops at once (exit 128 + the signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.exit_code = 128 + signum


def interrupt_exit_code(error: KeyboardInterrupt) -> int:
    """128 + the signal of a StoppedAtOnce; Python's own KeyboardInterrupt is SIGINT's 130."""
    return error.exit_code if isinstance(error, StoppedAtOnce) else EXIT_SIGINT
