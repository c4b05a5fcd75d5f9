"""`python -m trainer.serve`: the entry point; the code is in trainer/serving/serve.py."""

from trainer import cli

with cli.without_garbage_collection():
    from trainer.serving.serve import FLAGS
    from trainer.serving.serve import USAGE
    from trainer.serving.serve import main

if __name__ == "__main__":
    cli.start(main, FLAGS, USAGE)
