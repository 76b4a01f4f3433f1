"""Typed, frozen, validated options of the pruning pass, and their one parser.

A `PruneSpec` says how to prune one weight (the pattern and its parameters); a `PruneConfig`
says which weights to prune and with which spec (default, per-name overrides, minimum size).
Both are built from Python, from a dict (YAML recipes), or from the short spec strings of the
CLI; `parse_prune_config` is the single place where the loose forms are turned into objects, and
it is what the pass calls when `ct.PassPipeline.set_options` hands it a string or a dict.
"""

from __future__ import annotations

import math
import re
from typing import Any

import attrs
from milsparse.ir.errors import ConfigError
from milsparse.passes.config import (
    SelectionMethods,
    config_parser,
    exact_text,
    is_int,
    is_number,
    positive_int,
    spec_reader,
)

__all__ = [
    "PATTERNS",
    "PruneSpec",
    "PruneConfig",
    "parse_prune_spec",
    "parse_prune_config",
]

PATTERNS = ("magnitude", "threshold", "block", "n:m")
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


def _fraction(instance, attribute, value):
    if value is not None and not (is_number(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{attribute.name} must be a number in [0, 1], got {value!r}")


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
            is_number(self.threshold) and 0 <= self.threshold < float("inf")
        ):
            raise ConfigError(f"threshold must be a finite number >= 0, got {self.threshold!r}")
        if self.pattern == "n:m" and not (is_int(self.n, 0) and self.n <= self.m):
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
            return f"unstructured{scope}:{exact_text(self.sparsity)}"
        if self.pattern == "threshold":
            return f"threshold:{exact_text(self.threshold)}"
        if self.pattern == "block":
            return f"block{self.block_size}{axis}:{exact_text(self.sparsity)}"
        return f"{self.n}:{self.m}{axis}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


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
        raise ConfigError(
            f"bad axis {text!r} in {spec!r}: use @in (input channels, also @1) or @out "
            "(output channels, also @0)"
        )
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
            f"bad prune spec {text!r}: use unstructured[@channel]:S, threshold:T, "
            "blockB[@in|@out]:S or N:M[@in|@out] (e.g. unstructured:0.5, threshold:1e-3, "
            "block4:0.5, 2:4)"
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


_spec_from = spec_reader(PruneSpec, parse_prune_spec)


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
        if not is_number(self.dampening):
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
                not is_number(value) or not math.isfinite(value)
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
parse_prune_config = config_parser(PruneConfig, PruneSpec, "prune", "pattern", "'2:4'")
