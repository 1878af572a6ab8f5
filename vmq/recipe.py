"""Recipes: YAML files validated by pydantic schemas (extra keys forbidden), with ``--set`` overrides.

The mechanism is generic over the schema: ``load_recipe(path, Recipe, ["calibration.num_images=64"])``
reads the YAML, applies each override (the value is parsed as YAML, so ``8``, ``true``, ``[a, b]``
and ``null`` mean what they look like), validates, and on failure raises one clear
:class:`~vmq.errors.VmqError`; an unknown key names the closest valid key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Optional, Type, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vmq.errors import UsageError, VmqError

__all__ = ["StrictModel", "ModelSpec", "CalibrationSpec", "EvalSpec", "Recipe", "StageSpec", "ActivationScheme",
           "check_layer_patterns", "load_recipe", "parse_recipe", "apply_overrides", "dump_recipe", "read_recipe_yaml",
           "MAX_RECIPE_BYTES", "MAX_RECIPE_DEPTH"]

R = TypeVar("R", bound=BaseModel)
DEVICE = re.compile(r"cpu|cuda(:\d+)?")
#: a recipe file is a few kilobytes; anything past this is refused before it is parsed
MAX_RECIPE_BYTES = 1 << 20
#: nesting of YAML blocks and lists (a recipe needs 4)
MAX_RECIPE_DEPTH = 32
#: what may go wrong building Python values from YAML text besides yaml.YAMLError: a timestamp
#: that is no date, an integer past Python's digit limit, ...
_YAML_VALUE_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError, MemoryError)


class StrictModel(BaseModel):
    """Base of every recipe block: unknown keys are errors, values are checked on assignment, and
    numbers are finite (``.inf`` / ``.nan`` are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSpec(StrictModel):
    name: Optional[str] = Field(None, description="registered model name; default: the reference model")
    checkpoint: Optional[str] = Field(None, description="checkpoint file, or 'random' for randomly initialised "
                                                        "weights (seed 0); default: the shipped weights")


class CalibrationSpec(StrictModel):
    data: Optional[str] = Field(None, description="ImageNet-layout folder; default: the model's own calibration set")
    num_images: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)


class EvalSpec(StrictModel):
    data: Optional[str] = Field(None, description="ImageNet-layout folder; default: the shipped eval set")
    limit: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)


class Recipe(StrictModel):
    """The blocks every recipe has. Compression schemes extend it with their own stages."""

    version: int = Field(1, ge=1, le=1)
    seed: int = Field(0, ge=0, lt=1 << 63)
    device: str = Field("cpu", description="where calibration and compression run: cpu, cuda or cuda:N "
                                          "(--device overrides it)")
    model: ModelSpec = ModelSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    eval: EvalSpec = EvalSpec()


    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE.fullmatch(v):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {v!r}")
        return v


def check_layer_patterns(v: Optional[List[str]]) -> Optional[List[str]]:
    """``targets`` / ``ignore`` entries: exact layer names or ``re:`` regular expressions."""
    for item in v or []:
        if not item.strip():
            raise ValueError("empty layer name")
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except (re.error, OverflowError, RecursionError) as exc:  # a{10**20}; 10,000 nested groups
                raise ValueError(f"bad regular expression {_clip(item)}: {_clip(str(exc) or type(exc).__name__)}") \
                    from None
    return v


class StageSpec(StrictModel):
    """What every compression stage (``quantization:``, ``vq:``) has: a method and its layers."""

    method: str
    targets: Optional[List[str]] = Field(None, min_length=1, description="layer names or re: patterns; default: "
                                                                          "the model family's default targets")
    ignore: List[str] = Field(default_factory=list)

    _patterns = field_validator("targets", "ignore")(check_layer_patterns)


class ActivationScheme(StrictModel):
    num_bits: int = Field(8, ge=2, le=8, description="bits per activation (asymmetric unsigned integers)")
    strategy: Literal["token_static", "tensor_static", "token_dynamic"] = "token_static"


def apply_overrides(raw: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set expects KEY=VALUE with a dotted key (a.b=value), got {_clip(repr(item))}")
        try:
            parsed = _load_yaml(value) if value.strip() else ""
        except _YAML_VALUE_ERRORS:  # not YAML (or an alias, or too deep): the text itself
            parsed = value
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1], 1):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                whole = ".".join(parts[:depth])
                raise VmqError(f"--set {_clip(key)}: {_clip(part)} is a value ({_clip(repr(child))}), not a block; "
                               f"set {_clip(whole)} as a whole, or write it as a block in the recipe")
            node = child
        node[parts[-1]] = parsed
    return raw


def _submodel(annotation: Any) -> Optional[Type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _valid_keys(schema: Type[BaseModel], loc: tuple) -> List[str]:
    """Valid dotted keys beside the unknown one at ``loc``."""
    model: Optional[Type[BaseModel]] = schema
    prefix = []
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            if isinstance(part, int):
                prefix.append(str(part))
                continue
            return []
        prefix.append(part)
        model = _submodel(model.model_fields[part].annotation)
    if model is None:
        return []
    return [".".join(prefix + [name]) for name in model.model_fields]


def _format_error(schema: Type[BaseModel], exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = _clip(".".join(str(p) for p in loc) or "(top level)")
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(schema, loc)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (valid here: {', '.join(valid)})" if valid else "")
        return f"{source}: unknown recipe key '{key}'{hint}{more}"
    return f"{source}: recipe key '{key}': {_clip(err['msg'], 240)}{more}"


def parse_recipe(raw: Any, schema: Type[R] = Recipe, overrides: Iterable[str] = (), source: str = "recipe") -> R:
    """Validate an already-loaded mapping (plus overrides) against ``schema``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise VmqError(f"{source}: a recipe must be a mapping of keys to values, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise VmqError(_format_error(schema, exc, source)) from None


def load_recipe(path: Union[str, Path, None], schema: Type[R] = Recipe, overrides: Iterable[str] = ()) -> R:
    """Read a YAML recipe (or only defaults when ``path`` is None) and apply ``--set`` overrides."""
    if path is None:
        return parse_recipe({}, schema, overrides, source="recipe")
    return parse_recipe(read_recipe_yaml(path), schema, overrides, source=str(path))


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``: a few lines of them can stand for a
    document of billions of nodes) and with bounded nesting (composing is recursive)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{_clip(str(event.anchor), 40)}: anchors and "
                                              "aliases are not allowed in recipes (write the value out)",
                                              event.start_mark)
        if self.depth >= MAX_RECIPE_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_RECIPE_DEPTH} levels",
                                              self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_yaml(text: str) -> Any:
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_recipe_yaml(path: Union[str, Path]) -> Any:
    """The YAML document of a recipe file, as Python values (not validated); a missing, oversized,
    non-UTF-8 or malformed file raises a :class:`~vmq.errors.VmqError` naming the problem."""
    path = Path(path)
    if not path.exists():
        raise VmqError(f"recipe not found: {path}")
    if not path.is_file():
        raise VmqError(f"recipe {path} is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise VmqError(f"cannot read recipe {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise VmqError(f"recipe {path} is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a short YAML file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VmqError(f"recipe {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") \
            from None
    try:
        return _load_yaml(text)
    except yaml.reader.ReaderError as exc:
        what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise VmqError(f"{path}: not valid YAML: character {what} at offset {exc.position} is not allowed") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise VmqError(f"{path}: not valid YAML{where}" + (f": {_clip(problem)}" if problem else "")) from None
    except _YAML_VALUE_ERRORS as exc:  # a value YAML reads but Python cannot hold (2020-13-45, a 5000-digit number)
        what = "a number too long to read" if "integer string conversion" in str(exc) else str(exc)
        raise VmqError(f"{path}: not a valid recipe: {_clip(what or type(exc).__name__)}") from None


def _clip(text: str, n: int = 120) -> str:
    """``text`` on one line and at most about ``n`` characters, for error messages."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


def dump_recipe(recipe: BaseModel) -> str:
    """The resolved recipe as YAML (every default filled in), to save next to an output."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
