"""Errors the entry points turn into one line on stderr and an exit status (trainer.cli) instead of a traceback."""

import re


class UsageError(Exception):
    """A bad flag value or environment that the user can fix; the message says how."""


class Failure(Exception):
    """The work failed for a reason the message gives (not the user's input): exit status 1."""


class TrainingError(Failure):
    """Training cannot go on (for example a NaN loss); the message names the step."""


class TransientError(Exception):
    """The world failed, not the input or the work: storage or the network stayed unreachable past the retry time.
    Rerunning the same command later resumes from the last checkpoint, so launchers restart the job."""


class Preempted(Exception):
    """The cluster saved a checkpoint because a worker is being terminated; rerun to resume."""

    def __init__(self, step: int):
        super().__init__(f"Preempted: checkpoint saved at step {step}; rerun the same command to resume from it.")
        self.step = step


class ClusterError(TrainingError):
    """A multi-worker run lost a worker (it died, hung or became unreachable)."""

    def __init__(self, error: Exception):
        super().__init__(f"training stopped because a worker of the cluster failed or stopped answering "
                         f"({_informative_line(error)}). Restart the job; it resumes from the latest checkpoint.")


def _informative_line(error: Exception) -> str:
    """The line of a TensorFlow cluster error that names the cause; its first lines are boilerplate."""
    for line in str(error).splitlines():
        if re.search(r"crashed|reset|refused|unavailable|heartbeat|timed out|deadline|connection|aborted", line, re.I):
            return line.strip()[:200]
    return one_line(error, 200)


def one_line(error: BaseException, limit: int = 240) -> str:
    """An exception's message squeezed onto one short line, for quoting inside a UsageError."""
    return " ".join(str(error).split())[:limit] or type(error).__name__
