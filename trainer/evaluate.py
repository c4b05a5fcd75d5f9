"""`python -m trainer.evaluate`: the entry point; the code is in trainer/results/evaluate.py."""

from trainer import cli

with cli.without_garbage_collection():
    from trainer.results.evaluate import FLAGS
    from trainer.results.evaluate import USAGE
    from trainer.results.evaluate import main

if __name__ == "__main__":
    cli.start(main, FLAGS, USAGE)
