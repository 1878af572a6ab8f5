"""The shipped recipes: each parses, names a registered method and sets only what differs from the defaults."""

from pathlib import Path

import pytest
import yaml

from vmq.compress.api import read_recipe, stage_of
from vmq.compress.methods import METHODS, method_for

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_recipe_resolves(path):
    recipe = read_recipe(path)
    stage = stage_of(recipe)
    method = method_for(stage, getattr(recipe, stage), str(path))
    assert method.name in path.read_text()
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {stage}, f"{path.name} repeats top-level defaults: {sorted(set(raw) - {stage})}"


def test_every_method_has_a_shipped_recipe():
    shipped = {(stage_of(r), getattr(r, stage_of(r)).method) for r in map(read_recipe, CONFIGS)}
    assert shipped == {(stage, name) for stage, table in METHODS.items() for name in table}
