"""The two kinds of failure the CLI maps to exit codes: bad input (2) and a run that failed (1)."""
import signal


class CompressorError(Exception):
    """A failure of the run itself (exit 1)."""

    exit_code = 1


class BadInput(CompressorError):
    """The user gave something we cannot use: a path, a recipe, a flag value (exit 2)."""

    exit_code = 2


def sigterm_as_interrupt() -> None:
    """SIGTERM (a cancelled CI job, a rank ended by the others) raises KeyboardInterrupt, so it cleans up like Ctrl-C:
    no half-written output."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
