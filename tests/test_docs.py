"""The README says what the code does: its recipe table is generated from trainer/recipes.py."""

import re

from helpers import ROOT
from trainer import recipes


def test_readme_lists_every_recipe_exactly_as_defined():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- recipes:start -->\n(.*?)<!-- recipes:end -->", readme, re.S).group(1)
    assert block == recipes.markdown(), "regenerate it with: python -m trainer.recipes"
