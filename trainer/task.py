"""Entry point: `python -m trainer.task --model=resnet50 --strategy=mirrored ...`."""

from trainer import cli
from trainer import config as config_lib
from trainer.errors import UsageError

USAGE = """Trains, evaluates and exports an image classifier on a TFDS dataset under any tf.distribute strategy.

    python -m trainer.task --model=resnet50 --strategy=mirrored [--flag=value ...] [--flagfile=FILE]
"""
FLAGS = config_lib.define_flags(cli.flag_registry())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag (see --help).")
    config = config_lib.config_from_flags(FLAGS)  # A bad value is refused at once, before TensorFlow loads.
    # Imported here, after cli.exit_on_sigterm: TensorFlow takes seconds to import, and a SIGTERM meanwhile must
    # end the process with its documented status, not kill it.
    with cli.without_garbage_collection():
        from trainer.training import train

    train.run(config)


if __name__ == "__main__":
    cli.exit_on_sigterm()
    cli.start(main, FLAGS, USAGE)
