"""Typed, frozen, validated options of the pruning pass, and their one parser.

A `PruneSpec` says how to prune one weight (the pattern and its parameters); a `PruneConfig`
says which weights to prune and with which spec (default, per-name overrides, minimum size).
Both are built from Python, from a dict (YAML recipes), or from the short spec strings of the
CLI; `parse_prune_config` is the single place where the loose forms are turned into objects, and
it is what the pass calls when `ct.PassPipeline.set_options` hands it a string or a dict.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

import attrs
import yaml
from milsparse.ir.errors import ConfigError

__all__ = [
    "PATTERNS",
    "DEFAULT_OP_TYPES",
    "PruneSpec",
    "PruneConfig",
    "parse_prune_spec",
    "parse_prune_config",
]

PATTERNS = ("magnitude", "threshold", "block", "n:m")
DEFAULT_OP_TYPES = ("linear", "conv", "conv_transpose", "matmul")
_AXES = ("input", "output")
SCOPES = ("tensor", "channel")
# The fields each pattern reads; any other field given with it is a mistake worth reporting.
_PATTERN_FIELDS = {
    "magnitude": {"sparsity", "scope"},
    "threshold": {"threshold", "min_sparsity"},
    "block": {"sparsity", "block_size", "axis"},
    "n:m": {"n", "m", "axis"},
}
_FIELD_DEFAULTS = {"min_sparsity": 0.0, "scope": "tensor"}


def _is_number(value) -> bool:
    """A real number, and not a bool (YAML's `true` would otherwise read as 1.0)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fraction(instance, attribute, value):
    if value is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{attribute.name} must be a number in [0, 1], got {value!r}")


def positive_int(instance, attribute, value):
    """attrs validator: an integer >= 1 (not a bool)."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _positive_int_or_none(instance, attribute, value):
    if value is not None:
        positive_int(instance, attribute, value)


@attrs.frozen
class PruneSpec:
    """How to prune one weight.

    pattern: "magnitude" (exactly round(sparsity * N) smallest |w| zeroed), "threshold" (|w| <=
        threshold zeroed; left dense below `min_sparsity`), "block" (blocks of `block_size`
        consecutive channels along `axis`, by L2 norm) or "n:m" (n zeros in every m along `axis`).
    axis: "input" (the axis the consuming op reduces over) or "output" (the other channel axis);
        defaults: "input" for n:m, "output" for block.
    scope: magnitude only: "tensor" ranks the whole weight at once; "channel" ranks each output
        channel on its own, every channel pruned to the same sparsity (the choice for conv
        weights with batchnorm folded in, whose channels differ in scale).
    """

    pattern: str = attrs.field(validator=attrs.validators.in_(PATTERNS))
    sparsity: float | None = attrs.field(default=None, validator=_fraction)
    threshold: float | None = None
    min_sparsity: float = attrs.field(default=0.0, validator=_fraction)
    block_size: int | None = attrs.field(default=None, validator=_positive_int_or_none)
    n: int | None = None
    m: int | None = attrs.field(default=None, validator=_positive_int_or_none)
    axis: str | None = None
    scope: str = "tensor"

    def __attrs_post_init__(self):
        stray = sorted(
            name
            for name in ("sparsity", "threshold", "min_sparsity", "block_size", "n", "m", "axis",
                         "scope")
            if name not in _PATTERN_FIELDS[self.pattern]
            and getattr(self, name) != _FIELD_DEFAULTS.get(name)
        )  # fmt: skip
        if stray:
            raise ConfigError(
                f"pattern {self.pattern!r} takes {', '.join(sorted(_PATTERN_FIELDS[self.pattern]))}"
                f"; {', '.join(stray)} do not apply to it"
            )
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be 'tensor' or 'channel', got {self.scope!r}")
        need = {
            "magnitude": ("sparsity",),
            "threshold": ("threshold",),
            "block": ("sparsity", "block_size"),
            "n:m": ("n", "m"),
        }[self.pattern]
        missing = [name for name in need if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"pattern {self.pattern!r} needs {', '.join(missing)}")
        if self.threshold is not None and not (
            _is_number(self.threshold) and 0 <= self.threshold < float("inf")
        ):
            raise ConfigError(f"threshold must be a finite number >= 0, got {self.threshold!r}")
        if self.pattern == "n:m" and not (
            isinstance(self.n, int) and not isinstance(self.n, bool) and 0 <= self.n <= self.m
        ):
            raise ConfigError(f"n:m needs integers 0 <= n <= m, got {self.n}:{self.m}")
        if self.axis is not None and self.axis not in _AXES:
            raise ConfigError(f"axis must be 'input' or 'output', got {self.axis!r}")

    @property
    def resolved_axis(self) -> str:
        if self.axis is not None:
            return self.axis
        return "output" if self.pattern == "block" else "input"

    @property
    def nominal_sparsity(self) -> float:
        """The sparsity the spec aims at (threshold: its guaranteed minimum)."""
        if self.pattern == "n:m":
            return self.n / self.m
        if self.pattern == "threshold":
            return self.min_sparsity
        return float(self.sparsity)

    def to_string(self) -> str:
        """The CLI form, e.g. `2:4`, `block4@in:0.5`, `unstructured@channel:0.3`; numbers are
        written exactly (shortest round-trip repr), so parsing it gives this spec back.
        Threshold's min_sparsity is not in it."""
        axis = "" if self.axis is None else "@" + ("in" if self.axis == "input" else "out")
        if self.pattern == "magnitude":
            scope = "@channel" if self.scope == "channel" else ""
            return f"unstructured{scope}:{_exact(self.sparsity)}"
        if self.pattern == "threshold":
            return f"threshold:{_exact(self.threshold)}"
        if self.pattern == "block":
            return f"block{self.block_size}{axis}:{_exact(self.sparsity)}"
        return f"{self.n}:{self.m}{axis}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


def _exact(value: float) -> str:
    """The shortest text that reads back as exactly `value` (0.1234556, not 0.123456)."""
    return repr(float(value))


_SPEC_RE = re.compile(
    r"""^(?:
        unstructured(?:@(?P<scope>\w+))?:(?P<mag>[^:@]+)
      | threshold:(?P<thr>[^:@]+)
      | block(?P<bs>\d+)(?:@(?P<baxis>\w+))?:(?P<bsp>[^:@]+)
      | (?P<n>\d+):(?P<m>\d+)(?:@(?P<nmaxis>\w+))?
    )$""",
    re.VERBOSE,
)
_AXIS_WORDS = {
    "0": "output",
    "out": "output",
    "output": "output",
    "1": "input",
    "in": "input",
    "input": "input",
}


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number, got {text!r}") from None


def _axis_word(text: str | None, spec: str) -> str | None:
    if text is None:
        return None
    if text not in _AXIS_WORDS:
        raise ConfigError(f"bad axis {text!r} in {spec!r}: use @0/@out (output) or @1/@in (input)")
    return _AXIS_WORDS[text]


def parse_prune_spec(text: str) -> PruneSpec:
    """Parse `unstructured[@channel]:S`, `threshold:T`, `blockB[@AXIS]:S` or `N:M[@AXIS]`.

    AXIS is 0/out (output channels) or 1/in (input channels, the axis the consumer reduces).
    """
    if not isinstance(text, str):
        raise ConfigError(f"a prune spec must be a string, got {type(text).__name__}")
    spec = text.strip()
    match = _SPEC_RE.match(spec)
    if match is None:
        raise ConfigError(
            f"bad prune spec {text!r}: use unstructured[@channel]:S, threshold:T, blockB[@0|@1]:S "
            "or N:M[@0|@1]"
            " (e.g. unstructured:0.5, threshold:1e-3, block4:0.5, 2:4)"
        )
    g = match.groupdict()
    if g["mag"] is not None:
        scope = g["scope"] or "tensor"
        if scope not in SCOPES:
            raise ConfigError(f"bad scope {scope!r} in {spec!r}: use unstructured@channel:S")
        return PruneSpec("magnitude", sparsity=_number(g["mag"], "sparsity"), scope=scope)
    if g["thr"] is not None:
        return PruneSpec("threshold", threshold=_number(g["thr"], "threshold"))
    if g["bs"] is not None:
        return PruneSpec(
            "block",
            sparsity=_number(g["bsp"], "sparsity"),
            block_size=int(g["bs"]),
            axis=_axis_word(g["baxis"], spec),
        )
    return PruneSpec("n:m", n=int(g["n"]), m=int(g["m"]), axis=_axis_word(g["nmaxis"], spec))


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


_spec_from = spec_reader(PruneSpec, parse_prune_spec)


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
            f"unknown op types {', '.join(hints)}; weights are pruned in "
            f"{', '.join(DEFAULT_OP_TYPES)} (select other consts by name with op_names)"
        )
    return names


def _min_size(instance, attribute, value):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
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


@attrs.frozen
class PruneConfig(SelectionMethods):
    """Which weights the pruning pass touches, and how.

    spec: the default PruneSpec.
    op_types: consumer op types whose weight operand is pruned (linear/conv/conv_transpose
        `weight`, either const operand of matmul).
    op_names: fnmatch patterns; when given, only weights whose const name or consumer op name
        matches are pruned, and a const named here is pruned even if it feeds another op type.
    overrides: ordered (pattern, spec-or-None) pairs; the first pattern matching the const's name,
        else a consumer's name, gives its spec; None leaves the weight dense.
    min_size: weights with fewer elements stay dense.
    """

    spec: PruneSpec
    criterion: str = attrs.field(default="magnitude", kw_only=True)
    sequential: bool | None = attrs.field(default=None, kw_only=True)
    dampening: float = attrs.field(default=0.01, kw_only=True)
    allocate: str = attrs.field(default="uniform", kw_only=True)
    min_cosine: float | None = attrs.field(default=None, kw_only=True)
    min_snr: float | None = attrs.field(default=None, kw_only=True)
    read_spec = staticmethod(_spec_from)

    def __attrs_post_init__(self):
        self._check_selection(PruneSpec)
        if self.criterion not in CRITERIA:
            raise ConfigError(
                f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}"
            )
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise ConfigError(f"sequential must be true or false, got {self.sequential!r}")
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)):
            raise ConfigError(f"dampening must be a number, got {self.dampening!r}")
        if not 0.0 < float(self.dampening) <= 1.0:
            raise ConfigError(f"dampening must be in (0, 1], got {self.dampening!r}")
        if self.allocate not in ALLOCATIONS:
            raise ConfigError(
                f"allocate must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}"
            )
        if self.allocate != "uniform" and self.spec.pattern not in ("magnitude", "block"):
            raise ConfigError(
                f"allocate {self.allocate} chooses a sparsity per weight: it needs a pattern "
                f"with one (unstructured or block), not {self.spec.to_string()}"
            )
        for name in ("min_cosine", "min_snr"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):  # fmt: skip
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        floors = self.min_cosine is not None or self.min_snr is not None
        if self.allocate == "budget" and not floors:
            raise ConfigError("allocate budget needs a fidelity floor: min_cosine or min_snr")
        if floors and self.allocate != "budget":
            raise ConfigError("min_cosine and min_snr are the floor of allocate budget")
        if self.criterion != "magnitude" and self.spec.pattern == "threshold":
            raise ConfigError(
                f"criterion {self.criterion} applies to unstructured, n:m and block patterns, "
                "not threshold"
            )

    @property
    def is_sequential(self) -> bool:
        """Calibrate each weight on the outputs of the weights pruned before it (default for
        sparsegpt, as in the paper)."""
        if self.sequential is None:
            return self.criterion == "sparsegpt"
        return self.sequential and self.criterion != "magnitude"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.criterion != "magnitude":
            out["criterion"] = self.criterion
            out["dampening"] = self.dampening
            if self.sequential is not None:
                out["sequential"] = self.sequential
        if self.allocate != "uniform":
            out["allocate"] = self.allocate
            for name in ("min_cosine", "min_snr"):
                if getattr(self, name) is not None:
                    out[name] = getattr(self, name)
        return out


CRITERIA = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "global", "budget")
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


parse_prune_config = config_parser(PruneConfig, PruneSpec, "prune", "pattern", "'2:4'")
