"""Command-line plumbing of the trainer and the tools: flag registries, --help, one-line errors, log filter."""

import logging as python_logging
import os
import sys
from typing import Callable

from absl import flags
from absl import logging

from trainer.errors import UsageError

USAGE_EXIT_CODE = 2
HELP_FLAGS = ("--help", "-help", "--helpshort", "--helpfull", "-h", "-?")
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


def tool_flag_values() -> flags.FlagValues:
    """A private flag registry for one tool, holding absl's logging flags.

    The trainer's flags are global (trainer.config defines them on import, and trainer.storage imports
    it), so a tool defining --model_dir there would clash, and would quietly accept --epochs.
    """
    flag_values = flags.FlagValues()
    for flag in flags.FLAGS.get_flags_for_module("absl.logging"):
        flags.DEFINE_flag(flag, flag_values=flag_values, module_name="absl.logging")
    return flag_values


def parse_tool_flags(flag_values: flags.FlagValues, argv: list[str], usage: str) -> list[str]:
    """Parses a tool's flags: a bad flag is one line on stderr and exit 2; --help prints usage and exits 0."""
    if any(argument.split("=")[0] in HELP_FLAGS for argument in argv[1:]):
        print(f"{usage.strip()}\n\n{flag_values.get_help()}")
        sys.exit(0)
    flag_values.unparse_flags()  # Parsing twice in one process (as tests do) starts from the defaults.
    try:
        remaining = flag_values(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    # absl.app insists that the global registry is parsed; its flags keep their defaults.
    flags.FLAGS.mark_as_parsed()
    return remaining


def run_tool(main: Callable[[list[str]], int | None], argv: list[str]) -> None:
    """Runs a tool's main; a UsageError becomes one line on stderr and exit 2, without a traceback."""
    show_only_own_info_logs()
    try:
        exit_code = main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    sys.exit(exit_code or 0)
