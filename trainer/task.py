"""Entry point: `python -m trainer.task --model=resnet50 --strategy=mirrored ...`."""

import sys

from absl import app
from absl import flags
from absl import logging

from trainer import checkpoints
from trainer import cli
from trainer import config as config_lib
from trainer import train
from trainer.errors import TrainingError
from trainer.errors import UsageError

# The trainer's flags live in trainer.config; --help should list them, not only --helpfull.
flags.adopt_module_key_flags(config_lib)

# Exit status of a run that stopped on a user error, so scripts and cluster restart policies can
# tell it from a crash (1) and from a preemption (checkpoints.PREEMPTED_EXIT_CODE).
USAGE_EXIT_CODE = 2


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag (see --help).")
    cli.show_only_own_info_logs()
    train.run(config_lib.config_from_flags())


def run_main(argv: list[str]) -> None:
    try:
        main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except checkpoints.Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(checkpoints.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(run_main, flags_parser=config_lib.parse_flags)
