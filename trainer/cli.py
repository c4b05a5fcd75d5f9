"""Command-line plumbing of the results tools: private flag registries, --help, and one-line errors."""

import logging as python_logging
import sys
from typing import Callable

from absl import flags

from trainer.errors import UsageError

USAGE_EXIT_CODE = 2
HELP_FLAGS = ("--help", "-help", "--helpshort", "--helpfull", "-h", "-?")


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
    # TensorFlow's and TensorBoard's own INFO messages would bury the tool's.
    for name in ("tensorflow", "tensorboard"):
        python_logging.getLogger(name).setLevel(python_logging.WARNING)
    try:
        exit_code = main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    sys.exit(exit_code or 0)
