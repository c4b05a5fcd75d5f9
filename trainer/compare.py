"""`python -m trainer.compare`: the entry point; the code is in trainer/results/compare.py."""

from trainer import cli

with cli.without_garbage_collection():
    from trainer.results.compare import FLAGS
    from trainer.results.compare import USAGE
    from trainer.results.compare import main

if __name__ == "__main__":
    cli.start(main, FLAGS, USAGE)
