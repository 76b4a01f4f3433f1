"""Recipes: what to do to a model, as Python objects or YAML.

```yaml
target: ios18            # optional: raise the program's opset (ios16 | ios17 | ios18)
prune:
  spec: "2:4"            # or unstructured:0.5, threshold:1e-3, block4@in:0.5, or a mapping
  op_types: [linear, conv, conv_transpose, matmul]
  op_names: []           # fnmatch patterns; empty = every weight of op_types
  min_size: 2048
  overrides:             # first matching pattern wins; `dense` leaves the weight alone
    "lm_head*": dense
    "*attn*": unstructured:0.3
```
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from milsparse.errors import ConfigError
from milsparse.passes.config import PruneConfig, PruneSpec, parse_prune_config

__all__ = ["Recipe"]

_KEYS = {"prune", "target"}


def _target_name(instance, attribute, value):
    if value is not None:
        from milsparse._io import parse_target

        parse_target(value)


@attrs.frozen
class Recipe:
    prune: PruneConfig = attrs.field(converter=parse_prune_config)
    target: str | None = attrs.field(default=None, validator=_target_name)

    @classmethod
    def coerce(cls, value: Any) -> Recipe:
        """A Recipe from a Recipe, PruneConfig, PruneSpec, spec string or mapping."""
        if isinstance(value, Recipe):
            return value
        if isinstance(value, (PruneConfig, PruneSpec, str)):
            return cls(prune=value)
        if isinstance(value, Mapping):
            if set(value) & _KEYS:
                return cls.from_dict(value)
            return cls(prune=value)  # a bare prune config mapping
        raise ConfigError(f"cannot make a recipe from {type(value).__name__}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a recipe must be a mapping, got {type(data).__name__}")
        unknown = set(data) - _KEYS
        if unknown:
            raise ConfigError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(_KEYS)}")
        if "prune" not in data:
            raise ConfigError("a recipe needs a 'prune' section (e.g. prune: {spec: '2:4'})")
        return cls(prune=data["prune"], target=data.get("target"))

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Recipe:
        """Read a recipe from a YAML file (or YAML text containing a newline)."""
        text = str(path_or_text)
        if "\n" not in text:
            path = Path(text)
            try:
                text = path.read_text()
            except OSError as e:
                raise ConfigError(f"{path}: cannot read recipe: {e.strerror}") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe is not valid YAML: {e}") from e
        return cls.from_dict(data or {})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prune": self.prune.to_dict()}
        if self.target is not None:
            out["target"] = self.target
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
