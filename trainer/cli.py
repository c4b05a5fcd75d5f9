"""Entry-point plumbing of the trainer, the tools and the launchers: exit statuses, flag parsing, one-line errors.

It imports no TensorFlow, so the launchers can use it on a machine without it.
"""

import contextlib
import gc
import logging as python_logging
import os
import signal
import sys
import threading
from typing import Callable

from absl import app
from absl import flags
from absl import logging

from trainer.errors import Failure
from trainer.errors import Preempted
from trainer.errors import TransientError
from trainer.errors import UsageError

# Exit statuses, so that scripts and cluster restart policies can tell the outcomes apart.
FAILURE_EXIT_CODE = 1  # The work failed (a NaN loss, a lost worker, a failed cloud command).
USAGE_EXIT_CODE = 2  # The user's input is wrong; rerunning the same command cannot help.
PREEMPTED_EXIT_CODE = 42  # Stopped by SIGTERM, after a preemption checkpoint if training had begun; rerun.
# Storage or the network stayed unreachable past the retry time; rerunning later resumes. 75 is sysexits.h's
# EX_TEMPFAIL ("a temporary failure; the user is invited to retry").
TRANSIENT_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C, as shells report it.

# SIGTERM outside the training loop (whose PreemptionGuard checkpoints first): the process ends at once with
# PREEMPTED_EXIT_CODE, not killed by the signal (143). Nothing is lost by it: before the first checkpoint the run
# has written nothing a rerun needs, and after one the rerun resumes from it (see the README's reliability section).
STOPPED_BY_SIGTERM = ("error: stopped by SIGTERM (exit status 42): rerun the same command; it resumes from the last "
                      "checkpoint, or starts afresh if there was none.\n")


def _stop_on_sigterm(signum, frame) -> None:
    del signum, frame
    os.write(2, STOPPED_BY_SIGTERM.encode())  # Not print: the signal may interrupt a write to sys.stderr.
    sys.exit(PREEMPTED_EXIT_CODE)  # SystemExit: the `finally` blocks on the way out still release the run lock.


@contextlib.contextmanager
def without_garbage_collection():
    """Runs the block without Python's cyclic collector, then freezes what it made: for work that makes many
    long-lived objects and no garbage cycles, such as the imports of TensorFlow and Keras or listing a folder.

    The imports create about 335,000 objects, none of them garbage, and each full collection during the import walks
    all of them: `import trainer.training.train` took 4.5 s of CPU this way against 6.2 s (medians of five, on the
    2-core machines). Frozen afterwards, they are left out of every later collection too; what the program creates
    after them is collected as usual. (Python's documentation suggests the same before a fork, which folder
    preparation does.)
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.freeze()
            gc.enable()


def exit_on_sigterm() -> None:
    """Makes SIGTERM end the process with PREEMPTED_EXIT_CODE and one line; call it before importing TensorFlow,
    whose start-up takes seconds."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)


def note_sigterm() -> threading.Event:
    """An event that SIGTERM sets, wrapped around the handler in place (which still runs)."""
    received, handler = threading.Event(), signal.getsignal(signal.SIGTERM)

    def note(signum, frame):
        received.set()
        if callable(handler):
            handler(signum, frame)

    signal.signal(signal.SIGTERM, note)
    return received


HELP_FLAGS = ("--help", "-help", "--helpshort", "--helpfull", "--helpxml", "-h", "-?")
# Where this project's modules live, installed or not: their INFO messages are the job's log.
_OWN_MODULES = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), package, "")
                     for package in ("trainer", "launch"))


class _OwnInfoOnly(python_logging.Filter):
    """Passes warnings and errors from anywhere, and INFO from this project's modules, or all with --v=1."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        return (record.levelno >= python_logging.WARNING or record.pathname.startswith(_OWN_MODULES)
                or logging.get_verbosity() > logging.INFO)


def show_only_own_info_logs() -> None:
    """Keeps TensorFlow's, TFDS's and TensorBoard's INFO messages out of the log unless --v=1.

    They log through absl like us (dataset readers, checkpoint shards, SavedModel renames, one line per
    traced collective) and would bury the job's progress, so filtering by logger name is not enough.
    """
    if logging.get_verbosity() <= logging.INFO:
        # These two also log through loggers and handlers of their own.
        for name in ("tensorflow", "tensorboard"):
            python_logging.getLogger(name).setLevel(python_logging.WARNING)
    handler = logging.get_absl_handler()
    if not any(isinstance(existing, _OwnInfoOnly) for existing in handler.filters):
        handler.addFilter(_OwnInfoOnly())


def flag_registry() -> flags.FlagValues:
    """A flag registry for one entry point, holding absl's logging flags (--v, --logtostderr, ...).

    Each entry point defines its flags in a registry of its own, so that importing a module never defines
    flags and entry points imported into one process (as tests do) cannot clash over --model_dir.
    """
    flag_values = flags.FlagValues()
    for flag in flags.FLAGS.get_flags_for_module("absl.logging"):
        flags.DEFINE_flag(flag, flag_values=flag_values, module_name="absl.logging")
    return flag_values


def parse_flags(flag_values: flags.FlagValues, argv: list[str], usage: str, unknown_flag_hint: str = "") -> list[str]:
    """Parses an entry point's flags: a bad flag is one line on stderr and exit 2; --help prints usage, exits 0."""
    if any(argument.split("=")[0] in HELP_FLAGS for argument in argv[1:]):
        # The global registry also holds every library's flags; its main module's are the ones to show.
        help_text = flag_values.main_module_help() if flag_values is flags.FLAGS else flag_values.get_help()
        print(f"{usage.strip()}\n\n{help_text}")
        sys.exit(0)
    flag_values.unparse_flags()  # Parsing twice in one process (as tests do) starts from the defaults.
    try:
        remaining = flag_values(argv)
    except flags.Error as error:
        hint = unknown_flag_hint if "Unknown command line flag" in str(error) else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    if flag_values is not flags.FLAGS:
        # absl.app insists that the global registry is parsed; its flags keep their defaults.
        flags.FLAGS.mark_as_parsed()
    return remaining


def run(main: Callable[[list[str]], int | None], argv: list[str]) -> None:
    """Runs an entry point's main and exits with its status; each known error is one `error:` line, no traceback."""
    show_only_own_info_logs()
    try:
        exit_code = main(argv)
    except UsageError as error:
        _exit_with_error(error, USAGE_EXIT_CODE)
    except Failure as error:
        _exit_with_error(error, FAILURE_EXIT_CODE)
    except TransientError as error:
        _exit_with_error(error, TRANSIENT_EXIT_CODE)
    except Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:
        _exit_with_error("interrupted.", INTERRUPTED_EXIT_CODE)
    sys.exit(exit_code or 0)


def _exit_with_error(error, exit_code: int) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(exit_code)


def take_subcommand(word: str) -> bool:
    """Whether the command line names the subcommand `word` among the entry point's own arguments (before `--`);
    if it does, takes the word out of sys.argv, so that the subcommand's flags parse as any others."""
    end = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    if word not in sys.argv[1:end]:
        return False
    position = sys.argv.index(word, 1, end)
    sys.argv = sys.argv[:position] + sys.argv[position + 1:]
    return True


def start(main: Callable[[list[str]], int | None], flag_values: flags.FlagValues, usage: str,
          unknown_flag_hint: str = "") -> None:
    """What an entry point's `if __name__ == "__main__":` does: parse its flags, then `run` its main."""
    app.run(lambda argv: run(main, argv),
            flags_parser=lambda argv: parse_flags(flag_values, argv, usage, unknown_flag_hint))
