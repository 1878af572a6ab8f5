"""The recipe mechanism: YAML, strict schemas, --set overrides, errors that name the closest key."""

from typing import List

import pytest
from pydantic import Field

from vmq.errors import UsageError, VmqError
from vmq.recipe import Recipe, StrictModel, apply_overrides, dump_recipe, load_recipe, parse_recipe


class Quant(StrictModel):
    w_bits: int = Field(8, ge=2, le=8)
    targets: List[str] = ["re:.*in_proj"]


class QRecipe(Recipe):
    quant: Quant = Quant()


def test_defaults_and_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("seed: 3\ncalibration:\n  num_images: 64\nquant:\n  w_bits: 4\n")
    r = load_recipe(p, QRecipe)
    assert (r.seed, r.calibration.num_images, r.calibration.batch_size, r.quant.w_bits) == (3, 64, 32, 4)
    assert load_recipe(None).model.name is None


def test_overrides_are_yaml_typed(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("quant:\n  w_bits: 4\n")
    r = load_recipe(p, QRecipe, ["quant.w_bits=6", "calibration.num_images=16", "quant.targets=[a, b]",
                                 "model.checkpoint=null"])
    assert r.quant.w_bits == 6 and r.calibration.num_images == 16 and r.quant.targets == ["a", "b"]
    assert r.model.checkpoint is None


def test_override_creates_missing_block():
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", ".a=1"])
def test_override_syntax(bad):
    with pytest.raises(UsageError, match="KEY=VALUE"):
        apply_overrides({}, [bad])


def test_override_into_scalar():
    with pytest.raises(VmqError, match=r"is a value \(1\), not a block; set seed as a whole"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_unknown_key_names_closest(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("calibration:\n  num_image: 64\n")
    with pytest.raises(VmqError, match=r"unknown recipe key 'calibration.num_image' \(did you mean 'calibration.num_images'\?\)"):
        load_recipe(p, QRecipe)
    with pytest.raises(VmqError, match="did you mean 'quant.w_bits'"):
        parse_recipe({}, QRecipe, ["quant.wbits=4"])
    with pytest.raises(VmqError, match="did you mean 'calibration'"):
        parse_recipe({"calibraton": {}}, QRecipe)


def test_impossible_value():
    with pytest.raises(VmqError, match="recipe key 'quant.w_bits': Input should be less than or equal to 8"):
        parse_recipe({"quant": {"w_bits": 9}}, QRecipe)
    with pytest.raises(VmqError, match="quant.w_bits"):
        parse_recipe({"quant": {"w_bits": 0}}, QRecipe)


def test_bad_files(tmp_path):
    with pytest.raises(VmqError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(VmqError, match="not valid YAML at line"):
        load_recipe(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(VmqError, match="must be a mapping"):
        load_recipe(lst)


def test_dump_roundtrip(tmp_path):
    r = parse_recipe({"quant": {"w_bits": 4}}, QRecipe, ["seed=7"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(p, QRecipe) == r


def test_device_key():
    assert parse_recipe({}, QRecipe).device == "cpu"
    for ok in ("cpu", "cuda", "cuda:0", "cuda:3"):
        assert parse_recipe({"device": ok}, QRecipe).device == ok
        assert load_recipe(None, QRecipe, [f"device={ok}"]).device == ok
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "cpu:0", "mps", ""):
        with pytest.raises(VmqError, match="recipe key 'device': .*device must be cpu, cuda or cuda:N"):
            parse_recipe({"device": bad}, QRecipe)
    with pytest.raises(VmqError, match="did you mean 'device'"):
        parse_recipe({"devise": "cpu"}, QRecipe)
    r = parse_recipe({"device": "cuda:1"}, QRecipe)
    assert "device: cuda:1" in dump_recipe(r).splitlines()
