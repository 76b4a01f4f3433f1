"""Recipes: what to do to a model, as Python objects or YAML.

A recipe is an ordered list of steps, each one pass (`prune`, `palettize` or `quantize`) with
its own options, weight selection and per-name overrides; steps run in the order written:

```yaml
target: ios18            # optional: raise the program's opset (ios16 | ios17 | ios18 | ios26)
steps:
  - prune:
      spec: "2:4"        # or unstructured:0.5, threshold:1e-3, block4@in:0.5, or a mapping
      op_types: [linear, conv, conv_transpose, matmul]
      op_names: []       # fnmatch patterns; empty = every weight of op_types
      min_size: 2048
      overrides:         # first matching pattern wins; `dense` leaves the weight alone
        "lm_head*": dense
  - palettize: lut4      # a step's config: a spec string, or a mapping as above
```

The one-step form of earlier releases (`prune:` at the top level, next to `target:`) still
reads, and so does any top-level `prune:` / `palettize:` / `quantize:` section (run in the
order written). Each kind of step appears at most once (per-weight differences are overrides).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from milsparse.errors import ConfigError
from milsparse.passes.lut_config import PalettizeConfig, PalettizeSpec, parse_palettize_config
from milsparse.passes.prune_config import PruneConfig, PruneSpec, parse_prune_config
from milsparse.passes.quant_config import QuantizeConfig, QuantizeSpec, parse_quantize_config

__all__ = ["Recipe", "Step", "STEP_KINDS"]

STEP_KINDS = ("prune", "palettize", "quantize")
_PARSERS = {
    "prune": parse_prune_config,
    "palettize": parse_palettize_config,
    "quantize": parse_quantize_config,
}
_KIND_OF_TYPE = {
    PruneConfig: "prune",
    PruneSpec: "prune",
    PalettizeConfig: "palettize",
    PalettizeSpec: "palettize",
    QuantizeConfig: "quantize",
    QuantizeSpec: "quantize",
}
_KEYS = {"steps", "target", *STEP_KINDS}


def kind_of_text(text: str) -> str:
    """The step a bare spec string belongs to: `lut4...` palettize, `int8...`/`uint4...`
    quantize, anything else prune (`2:4`, `unstructured:0.5`, ...)."""
    head = text.strip().lower()
    if head.startswith("lut"):
        return "palettize"
    if head.startswith(("int", "uint")):
        return "quantize"
    return "prune"


@attrs.frozen
class Step:
    """One pass of a recipe: `kind` (prune | palettize | quantize) and its config (anything
    that pass's config parser reads: a config, a spec, a spec string, a mapping)."""

    kind: str = attrs.field(validator=attrs.validators.in_(STEP_KINDS))
    config: Any = attrs.field(
        converter=attrs.Converter(lambda v, self: _PARSERS[self.kind](v), takes_self=True)
    )

    @property
    def pass_name(self) -> str:
        return f"milsparse::{self.kind}"

    def make_pass(self, context=None):
        """A fresh instance of this step's pass (found in the pass registry), configured, with
        the run's `passes.run_context.RunContext`."""
        from milsparse.passes.registry import pass_class

        return pass_class(self.pass_name)(self.config, context)

    def describe(self) -> str:
        return f"{self.kind} {self.config.spec.to_string()}"

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.config.to_dict()}

    @classmethod
    def coerce(cls, value: Any) -> Step:
        """A Step from a Step, a config or spec object, a bare spec string, or a one-key
        mapping `{kind: config}`."""
        if isinstance(value, Step):
            return value
        kind = _KIND_OF_TYPE.get(type(value))
        if kind is not None:
            return cls(kind, value)
        if isinstance(value, str):
            return cls(kind_of_text(value), value)
        if isinstance(value, Mapping):
            if len(value) != 1 or next(iter(value)) not in STEP_KINDS:
                raise ConfigError(
                    f"a step is a mapping with one key, one of {', '.join(STEP_KINDS)} "
                    f"(e.g. {{palettize: lut4}}); got keys {sorted(map(str, value))}"
                )
            ((kind, config),) = value.items()
            return cls(kind, config)
        raise ConfigError(f"cannot make a recipe step from {type(value).__name__}")


def _read_recipe_text(path: Path) -> str:
    """A recipe file's text: UTF-8 (a BOM allowed), whatever the locale says."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe: {e.strerror}") from e
    how = "save it as UTF-8 (YAML files are UTF-8; this one looks like UTF-16)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if not data.startswith((b"\xff\xfe", b"\xfe\xff")):
            how = "save it as UTF-8"
        raise ConfigError(
            f"{path}: the recipe must be UTF-8 text (byte {e.start} is not UTF-8); {how}"
        ) from e
    if "\x00" in text:  # UTF-16 without a BOM decodes as UTF-8 when it is all ASCII
        raise ConfigError(f"{path}: the recipe must be UTF-8 text (it holds NUL bytes); {how}")
    return text


def _steps(value) -> tuple[Step, ...]:
    if isinstance(value, (Step, str, Mapping)) or type(value) in _KIND_OF_TYPE:
        value = [value]
    if not isinstance(value, Sequence):
        raise ConfigError(f"steps must be a list, got {type(value).__name__}")
    steps = []
    for i, item in enumerate(value, 1):
        try:
            steps.append(Step.coerce(item))
        except ConfigError as e:
            raise ConfigError(f"step {i}: {e}") from e
    if not steps:
        raise ConfigError("a recipe needs at least one step (prune, palettize or quantize)")
    kinds = [s.kind for s in steps]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise ConfigError(
            f"{', '.join(repeated)} appears more than once in the recipe; give one step per "
            "kind, with overrides for weights that need other settings"
        )
    return tuple(steps)


def _target_name(instance, attribute, value):
    if value is not None:
        from milsparse.targets import parse_target

        parse_target(value)


@attrs.frozen
class Recipe:
    """Ordered steps and an optional deployment target. `Recipe(["2:4", "lut4"], "ios18")`
    reads each step like `Step.coerce`."""

    steps: tuple[Step, ...] = attrs.field(converter=_steps)
    target: str | None = attrs.field(default=None, validator=_target_name)

    def step(self, kind: str) -> Step | None:
        return next((s for s in self.steps if s.kind == kind), None)

    @property
    def prune(self) -> PruneConfig | None:
        """The prune step's config (None when the recipe does not prune)."""
        step = self.step("prune")
        return None if step is None else step.config

    @property
    def pass_names(self) -> list[str]:
        return [s.pass_name for s in self.steps]

    def with_steps(self, steps) -> Recipe:
        return Recipe(steps, self.target)

    @classmethod
    def coerce(cls, value: Any) -> Recipe:
        """A Recipe from a Recipe, a step (config, spec, spec string, `{kind: config}`), a list
        of steps, a recipe mapping, or a bare prune config mapping."""
        if isinstance(value, Recipe):
            return value
        if isinstance(value, Mapping):
            if set(value) & _KEYS:
                return cls.from_dict(value)
            return cls([Step("prune", value)])  # a bare prune config mapping
        if isinstance(value, (str, Step)) or type(value) in _KIND_OF_TYPE:
            return cls([value])
        if isinstance(value, Sequence):
            return cls(list(value))
        raise ConfigError(f"cannot make a recipe from {type(value).__name__}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a recipe must be a mapping, got {type(data).__name__}")
        unknown = set(data) - _KEYS
        if unknown:
            raise ConfigError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(_KEYS)}")
        sections = [k for k in data if k in STEP_KINDS]
        if "steps" in data:
            if sections:
                raise ConfigError(
                    f"a recipe has either 'steps' or top-level {'/'.join(STEP_KINDS)} "
                    f"sections, not both (found steps and {', '.join(sections)})"
                )
            steps = data["steps"]
            if isinstance(steps, (str, Mapping)) or not isinstance(steps, Sequence):
                raise ConfigError("'steps' must be a list (e.g. steps: [{prune: '2:4'}])")
        elif sections:
            steps = [{k: data[k]} for k in sections]
        else:
            raise ConfigError(
                "a recipe needs 'steps' (or a 'prune', 'palettize' or 'quantize' section), "
                "e.g. steps: [{prune: '2:4'}, {palettize: lut4}]"
            )
        return cls(steps, data.get("target"))

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Recipe:
        """Read a recipe from a YAML file (or YAML text containing a newline)."""
        text = str(path_or_text)
        if "\n" not in text:
            text = _read_recipe_text(Path(text))
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe is not valid YAML: {e}") from e
        return cls.from_dict(data or {})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.target is not None:
            out["target"] = self.target
        out["steps"] = [s.to_dict() for s in self.steps]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
