"""`python -m trainer.predict`: the entry point; the code is in trainer/results/predict.py."""

from trainer import cli

with cli.without_garbage_collection():
    from trainer.results.predict import FLAGS
    from trainer.results.predict import USAGE
    from trainer.results.predict import main

if __name__ == "__main__":
    cli.start(main, FLAGS, USAGE)
