"""The docs say what the code does: docs/training.md's flag and recipe tables are generated from trainer/config.py and
trainer/recipes.py."""

import re

from helpers import ROOT
from trainer import config
from trainer import recipes


def test_readme_lists_every_recipe_exactly_as_defined():
    readme = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"<!-- recipes:start -->\n(.*?)<!-- recipes:end -->", readme, re.S).group(1)
    assert block == recipes.markdown(), "regenerate it with: python -m trainer.recipes"


def test_readme_lists_every_flag_exactly_as_declared():
    readme = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"<!-- flags:start -->\n(.*?)<!-- flags:end -->", readme, re.S).group(1)
    assert block == config.markdown(), "regenerate it with: python -m trainer.config"
