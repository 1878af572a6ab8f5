"""Property-based fuzzing of recipe parsing and ``--set`` overrides: nothing but VmqError escapes.

Every example goes through both recipe schemas (PTQ and VQ). The runs are derandomized (the same
examples every time); ``VMQ_FUZZ_EXAMPLES`` scales them (default 300 per test), e.g. a long run:

    VMQ_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz_recipe.py tests/test_fuzz_pth.py \
        --hypothesis-show-statistics

(``--hypothesis-show-statistics`` prints how many examples each test ran).
"""

import os
import string
import tempfile
from pathlib import Path
from typing import List

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from vmq.compress.api import read_recipe
from vmq.errors import VmqError
from vmq.quant.recipe import PRESETS, QuantRecipe
from vmq.recipe import _submodel, apply_overrides, dump_recipe, load_recipe, parse_recipe
from vmq.vq.recipe import VQRecipe

SCHEMAS = (QuantRecipe, VQRecipe)
EXAMPLES = int(os.environ.get("VMQ_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def _paths(model: type, prefix: str = "") -> List[str]:
    out = []
    for name, info in model.model_fields.items():
        out.append(prefix + name)
        sub = _submodel(info.annotation)
        if sub is not None:
            out += _paths(sub, prefix + name + ".")
    return out


#: every dotted key of both schemas
PATHS = sorted(set(_paths(QuantRecipe)) | set(_paths(VQRecipe)))
NAMES = sorted({p.split(".")[-1] for p in PATHS})

# leaf values: what YAML can produce, with the schemas' own words and edge numbers well represented
words = st.sampled_from(NAMES + list(PRESETS) + ["w4a8", "rtn", "ptq4vm", "kmeans", "vimvq", "gptq", "cpu", "cuda",
                                                 "cuda:1", "gpu", "random", "re:.*", "re:(", "re:a{99999999999999999999}",
                                                 "token_static", "channel", "mse", "fp_input", "", " ", "\x00"])
numbers = st.one_of(st.integers(), st.integers(min_value=-3, max_value=70), st.sampled_from([2 ** 63, 2 ** 64, -2 ** 63]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 0.5, 1e-300, 1e300]))
leaves = st.one_of(st.none(), st.booleans(), numbers, words, st.text(max_size=12), st.binary(max_size=8))
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=8), st.integers(-2, 2), st.booleans(), st.none())
structures = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(keys, inner, max_size=5)), max_leaves=30)
recipes = st.dictionaries(st.sampled_from(NAMES + ["quantization", "vq"]), structures, max_size=6)


def _nest(items) -> dict:
    """``[("a.b", 1), ("a.c", 2)]`` -> ``{"a": {"b": 1, "c": 2}}`` (a later key wins over an earlier value)."""
    out: dict = {}
    for path, value in items:
        node = out
        *parents, last = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return out


#: values put on the schemas' own keys, so that every field validator sees hostile values
guided = st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(leaves, st.lists(leaves, max_size=4), structures)),
                  max_size=8).map(_nest)
recipes = st.one_of(recipes, guided)


def _only_vmq_errors(call) -> object:
    try:
        return call()
    except VmqError:
        return None


def _check_roundtrip(recipe, schema) -> None:
    """A recipe that parses dumps to YAML that parses to the same recipe."""
    again = parse_recipe(yaml.safe_load(dump_recipe(recipe)), schema)
    assert again == recipe


@FUZZ
@given(raw=st.one_of(structures, recipes))
def test_parse_recipe_raises_only_vmq_errors(raw):
    for schema in SCHEMAS:
        r = _only_vmq_errors(lambda: parse_recipe(raw if not isinstance(raw, dict) else dict(raw), schema))
        if r is not None:
            _check_roundtrip(r, schema)
    if isinstance(raw, dict):
        _only_vmq_errors(lambda: read_recipe(dict(raw)))


def _load_text(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "recipe.yaml"
        p.write_bytes(data)
        for schema in SCHEMAS:
            r = _only_vmq_errors(lambda: load_recipe(p, schema))
            if r is not None:
                _check_roundtrip(r, schema)
        _only_vmq_errors(lambda: read_recipe(p))


yaml_chars = st.sampled_from(list(":-[]{}&*!|>'\"#%@`,?\n\t .=<") + list(string.ascii_lowercase[:6]) + list("019"))
nested_texts = st.tuples(st.sampled_from(PATHS), st.integers(0, 3000), st.sampled_from(["[]", "{}"])).map(
    lambda t: f"{t[0].split('.')[0]}: " + t[2][0] * t[1] + t[2][1] * t[1] + "\n")
alias_texts = st.tuples(st.sampled_from(PATHS), st.integers(1, 12)).map(
    lambda t: "a: &a [x, x, x, x]\n" + "".join(f"l{i}: &l{i} [*{'a' if i == 0 else f'l{i - 1}'}, "
                                                 f"*{'a' if i == 0 else f'l{i - 1}'}]\n" for i in range(t[1]))
    + f"{t[0].split('.')[0]}: *l{t[1] - 1}\n")
yaml_texts = st.one_of(st.text(yaml_chars, max_size=80), st.text(max_size=80), nested_texts, alias_texts)


@FUZZ
@given(text=yaml_texts)
def test_load_recipe_random_text(text):
    _load_text(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(data=st.binary(max_size=200))
def test_load_recipe_random_bytes(data):
    _load_text(data)


@FUZZ
@given(raw=recipes, cut=st.integers(0, 400), insert=st.text(yaml_chars, max_size=6))
def test_load_recipe_mangled_yaml(raw, cut, insert):
    """A YAML dump of a random recipe with a few characters spliced in somewhere."""
    try:
        text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return
    cut = min(cut, len(text))
    _load_text((text[:cut] + insert + text[cut:]).encode("utf-8", "surrogatepass"))


dotted = st.one_of(st.sampled_from(PATHS), st.lists(st.one_of(st.sampled_from(NAMES), st.text(max_size=5)),
                                                    min_size=0, max_size=4).map(".".join))
values = st.one_of(st.sampled_from(["8", "-1", "1e999", ".nan", "[a, b]", "{a: 1}", "null", "true", "W4A8", "*a",
                                    "&a [1]", "[" * 60 + "]" * 60, "!!python/name:os.system", "2020-13-45",
                                    "9" * 5000, "0x" + "f" * 40, "re:(", "'", "\x00", ""]),
                   yaml_texts, structures.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()
                                              if not isinstance(v, bytes) else "x"))
overrides = st.lists(st.one_of(st.tuples(dotted, st.sampled_from(["=", "", "==", " = "]), values).map("".join),
                               st.text(max_size=20)), max_size=4)


@FUZZ
@given(base=recipes, items=overrides)
def test_set_overrides_raise_only_vmq_errors(base, items):
    for schema in SCHEMAS:
        r = _only_vmq_errors(lambda: parse_recipe(dict(base), schema, items))
        if r is not None:
            _check_roundtrip(r, schema)
    _only_vmq_errors(lambda: apply_overrides({}, items))


@pytest.mark.parametrize("schema", SCHEMAS)
def test_valid_overrides_still_work(schema):
    """The fuzzing's guards keep the ordinary cases: YAML values, strings, lists."""
    stage = "quantization" if schema is QuantRecipe else "vq"
    r = parse_recipe({}, schema, ["seed=7", "calibration.num_images=16", f"{stage}.ignore=[a, 're:b.*']",
                                  "model.checkpoint=*weights.pth", "model.name=[unclosed"])
    assert (r.seed, r.calibration.num_images, getattr(r, stage).ignore) == (7, 16, ["a", "re:b.*"])
    assert (r.model.checkpoint, r.model.name) == ("*weights.pth", "[unclosed")  # not YAML: the text itself


def test_model_fields_cover_both_schemas():
    assert "quantization.jlss.lr_scale" in PATHS and "vq.codebook.size" in PATHS
    assert all(issubclass(s, BaseModel) for s in SCHEMAS)
