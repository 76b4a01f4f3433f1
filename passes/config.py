"""What every pass's config shares: the selection fields, the spec reader and the one parser.

Each weight pass has a frozen spec (how to compress one weight) and a config (which weights,
with which spec): `prune_config`, `lut_config` and `quant_config`. They share what is here:
`SelectionMethods` (op types, op names, per-name overrides, minimum size), `spec_reader` (a spec
from its object, short text, mapping or `dense`) and `config_parser` (a config from any of the
loose forms `ct.PassPipeline.set_options`, recipes and the CLI hand a pass).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

import attrs
import yaml
from milsparse.ir.errors import ConfigError

__all__ = [
    "DEFAULT_OP_TYPES",
    "SelectionMethods",
    "config_parser",
    "is_number",
    "exact_text",
    "overrides_of",
    "positive_int",
    "spec_reader",
]

DEFAULT_OP_TYPES = ("linear", "conv", "conv_transpose", "matmul")


def is_number(value) -> bool:
    """A real number, and not a bool (YAML's `true` would otherwise read as 1.0)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value, at_least: int) -> bool:
    """An integer >= `at_least`, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


def positive_int(instance, attribute, value):
    """attrs validator: an integer >= 1 (not a bool)."""
    if not is_int(value, 1):
        raise ConfigError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def exact_text(value: float) -> str:
    """The shortest text that reads back as exactly `value` (0.1234556, not 0.123456)."""
    return repr(float(value))


def spec_reader(spec_type, parse_text):
    """A reader `(value, where) -> spec or None` of one pass's specs: a spec object, its short
    text (`parse_text`), a mapping of its fields, or dense/none/skip/null for no spec."""

    def read(value: Any, where: str):
        if value is None or isinstance(value, spec_type):
            return value
        if isinstance(value, str):
            if value.strip().lower() in ("dense", "none", "skip"):
                return None
            return parse_text(value)
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in attrs.fields(spec_type)}
            if unknown:
                raise ConfigError(f"unknown keys in {where}: {sorted(unknown)}")
            try:
                return spec_type(**value)
            except (TypeError, ValueError) as e:
                if isinstance(e, ConfigError):
                    raise
                raise ConfigError(f"bad {where}: {e}") from e
        raise ConfigError(
            f"{where} must be a spec string, a mapping or null, got {type(value).__name__}"
        )

    return read


def overrides_of(value, spec_from) -> tuple[tuple[str, Any], ...]:
    """Ordered (name pattern, spec or None) pairs from a mapping or pairs, each spec read by
    `spec_from(value, where)` (one per pass kind)."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for item in items:
        try:
            pattern, spec = item
        except (TypeError, ValueError):
            raise ConfigError(
                f"an override must be a (name pattern, spec) pair, got {item!r}"
            ) from None
        out.append((str(pattern), spec_from(spec, f"override {pattern!r}")))
    return tuple(out)


def _str_tuple(value) -> tuple[str, ...]:
    """A comma-separated string or a list of strings, as a tuple of the names."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value)
    raise ConfigError(f"expected a comma-separated string or a list of names, got {value!r}")


def _op_types(value) -> tuple[str, ...]:
    names = _str_tuple(value)
    unknown = [n for n in names if n not in DEFAULT_OP_TYPES]
    if unknown:
        hints = [f"{n!r} (did you mean {n.lower()!r}?)" if n.lower() in DEFAULT_OP_TYPES
                 else repr(n) for n in unknown]  # fmt: skip
        raise ConfigError(
            f"unknown op types {', '.join(hints)}; the passes compress weights read by "
            f"{', '.join(DEFAULT_OP_TYPES)} (select other consts by name with op_names)"
        )
    return names


def _min_size(instance, attribute, value):
    if not is_int(value, 0):
        raise ConfigError(f"min_size must be an integer >= 0, got {value!r}")


def _overrides_of_config(value, config):
    return overrides_of(value, type(config).read_spec)


@attrs.frozen(kw_only=True)
class SelectionMethods:
    """What the weight-pass template asks of a config, and what every pass's config shares:
    the selection fields (keyword-only, after each config's own `spec`), read with the
    config's `read_spec` (a `spec_reader`)."""

    op_types: tuple[str, ...] = attrs.field(default=DEFAULT_OP_TYPES, converter=_op_types)
    op_names: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    overrides: tuple[tuple[str, Any], ...] = attrs.field(
        default=(), converter=attrs.Converter(_overrides_of_config, takes_self=True)
    )
    min_size: int = attrs.field(default=2048, validator=_min_size)

    def override_for(self, *names: str) -> tuple[bool, Any, str | None]:
        """(matched, spec, pattern) of the first override matching any of `names` in order."""
        for name in names:
            for pattern, spec in self.overrides:
                if fnmatchcase(name, pattern):
                    return True, spec, pattern
        return False, None, None

    def names_selected(self, *names: str) -> bool:
        return not self.op_names or any(fnmatchcase(n, p) for n in names for p in self.op_names)

    def _check_selection(self, spec_type) -> None:
        if not isinstance(self.spec, spec_type):
            raise ConfigError(
                f"spec must be a {spec_type.__name__}, got {type(self.spec).__name__}"
            )
        if not self.op_types:
            raise ConfigError("op_types must name at least one op type")

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "op_types": list(self.op_types),
            "op_names": list(self.op_names),
            "overrides": {p: (None if s is None else s.to_dict()) for p, s in self.overrides},
            "min_size": self.min_size,
        }


_CONFIG_KEYS = {"spec", "op_types", "op_names", "overrides", "min_size"}


def config_parser(config_type, spec_type, kind: str, bare_key: str, example: str):
    """The one parser of a pass's config (what `ct.PassPipeline.set_options` hands a pass):
    the config itself, a spec, the spec's short text, JSON or YAML text, or a mapping of the
    config's fields (`spec` a string or a mapping), or of a bare spec's (told by `bare_key`)."""

    def parse(value: Any):
        if isinstance(value, config_type):
            return value
        if isinstance(value, spec_type):
            return config_type(spec=value)
        if isinstance(value, str):
            text = value.strip()
            if text[:1] in "{[" or "\n" in text or text.startswith("spec:"):
                try:
                    loaded = json.loads(text) if text[:1] in "{[" else yaml.safe_load(text)
                except (ValueError, yaml.YAMLError) as e:
                    raise ConfigError(f"cannot read {kind} config text: {e}") from e
                return parse(loaded)
            return parse({"spec": text})
        if isinstance(value, Mapping):
            if "spec" not in value and bare_key in value:
                return config_type(spec=config_type.read_spec(dict(value), "spec"))
            keys = {f.name for f in attrs.fields(config_type)} & (
                _CONFIG_KEYS | set(getattr(config_type, "__annotations__", {}))
            )
            unknown = set(value) - keys
            if unknown:
                raise ConfigError(
                    f"unknown {kind} config keys {sorted(unknown)}; known: {sorted(keys)}"
                )
            if "spec" not in value:
                raise ConfigError(f"{kind} config needs a 'spec' (e.g. spec: {example})")
            spec = config_type.read_spec(value["spec"], "spec")
            if spec is None:
                raise ConfigError(
                    "the default spec cannot be 'dense'; leave weights dense with overrides"
                )
            rest = {k: value[k] for k in keys - {"spec"} if k in value}
            return config_type(spec=spec, **rest)
        raise ConfigError(f"cannot make a {kind} config from {type(value).__name__}")

    parse.__doc__ = (
        f"A {config_type.__name__} from itself, a {spec_type.__name__}, a spec string, a "
        f"mapping, or JSON/YAML text (see `config_parser`)."
    )
    return parse
