"""The milsparse pass registry: passes declare their ordering, the registry derives pipelines.

Ordering is data. Each pass declares
- `requires`: passes that must be in the pipeline and run earlier;
- `after` / `before`: order constraints that apply only when both passes are present (names of
  coremltools passes are allowed here: they anchor the pass inside `ct.convert`'s pipeline);
- `conflicts`: passes it cannot share a pipeline with;
- `min_target`: the lowest deployment target whose opset has the ops it emits;
- `transforms`: the weight states it consumes and what it makes of each, with the lowest target
  of each produced form (`("sparse", "sparse+palettized", iOS18)`); a pass that declares none
  leaves weight states alone.

`order_passes` builds an `nx.DiGraph` over the requested passes and returns
`nx.lexicographical_topological_sort` keyed by the order they were asked in, so passes the
declarations do not order keep that order; a loop is reported with `nx.find_cycle`.
`place_in_pipeline` inserts the ordered passes into a coremltools `PassPipeline` after the last
occurrence of every coremltools pass they must follow, and warns (`PipelineWarning`) when none
of those is in it.

`check_chain` follows the weight states through a list of steps before anything runs: a step
that consumes none of the states the steps before it leave, or that would produce a form its
target cannot hold, is a `PipelineError` naming the steps.

Passes of any namespace take part: `@graph_pass("mytools::fold", "summary", before=(...))`
(or `@graph_pass(spec)` with a `PassSpec`, as milsparse's own passes do with theirs from
`passes/catalog.py`) registers a class with coremltools and its declarations here in one step,
refusing a name already taken; `pass_class(name)` finds the class again.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import coremltools as ct
import networkx as nx
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
from milsparse.ir.errors import PipelineError
from milsparse.passes.catalog import WEIGHT_STATES, PassSpec

__all__ = [
    "PassSpec",
    "PipelineWarning",
    "MILSPARSE_PASSES",
    "register",
    "graph_pass",
    "pass_class",
    "pass_spec",
    "order_passes",
    "place_in_pipeline",
    "WEIGHT_STATES",
    "ChainStep",
    "check_chain",
    "chain_dot",
]


class PipelineWarning(UserWarning):
    """A pipeline was built, but not as its declarations intend (a missing anchor)."""


MILSPARSE_PASSES: dict[str, PassSpec] = {}


# name -> the class registered with coremltools under it (`pass_class`)
_CLASSES: dict[str, type] = {}


def _target(value, where: str):
    if isinstance(value, AvailableTarget):
        return value
    try:
        return AvailableTarget[value]
    except (KeyError, TypeError):
        known = ", ".join(AvailableTarget.__members__)
        raise PipelineError(f"{where}: unknown target {value!r}; known: {known}") from None


def _with_targets(spec: PassSpec) -> PassSpec:
    """`spec` with its targets as coremltools' AvailableTarget (a declaration may name them)."""
    return dataclasses.replace(
        spec,
        min_target=_target(spec.min_target, spec.name),
        transforms=tuple((c, p, _target(t, spec.name)) for c, p, t in spec.transforms),
    )


def register(spec: PassSpec) -> PassSpec:
    """Add a pass's ordering declaration; its class must already be in coremltools' registry.
    Any namespace (`mytools::fold`); a name declared twice is refused."""
    if spec.name in MILSPARSE_PASSES:
        raise PipelineError(f"{spec.name} is already registered")
    if spec.name not in PASS_REGISTRY:
        raise PipelineError(f"{spec.name} is not registered with coremltools' PASS_REGISTRY")
    spec = _with_targets(spec)
    MILSPARSE_PASSES[spec.name] = spec
    return spec


def graph_pass(spec: PassSpec | str, summary: str | None = None, **declarations):
    """Class decorator: register a graph pass with coremltools (so `ct.PassPipeline` and
    `ct.convert` find it) and its declarations with milsparse, in one step.

        @graph_pass("mytools::fold_scales", "fold scales into weights",
                    before=("milsparse::prune",))
        class FoldScales(AbstractGraphPass):
            def apply(self, prog): ...

    Give a `PassSpec`, or its name, summary and other fields (requires, after, before,
    conflicts, min_target, options, transforms). A name already registered, with either
    registry, is refused.
    """
    if not isinstance(spec, PassSpec):
        spec = PassSpec(name=spec, summary=summary or "", **declarations)
    elif summary is not None or declarations:
        raise PipelineError("graph_pass: give a PassSpec alone, or a name and its fields")
    namespace, _, short = spec.name.partition("::")

    def decorate(cls):
        if spec.name in PASS_REGISTRY or spec.name in MILSPARSE_PASSES:
            raise PipelineError(f"{spec.name} is already registered")
        PASS_REGISTRY.add(namespace, cls, override=False, name=short)
        try:
            register(spec)
        except BaseException:
            PASS_REGISTRY.passes.pop(spec.name, None)
            raise
        _CLASSES[spec.name] = cls
        return cls

    return decorate


def pass_class(name: str) -> type:
    """The class of registered pass `name` (registered with `graph_pass`)."""
    pass_spec(name)
    try:
        return _CLASSES[name]
    except KeyError:
        raise PipelineError(f"{name} was registered without graph_pass: no class known") from None


def pass_spec(name: str) -> PassSpec:
    """The registered declaration of pass `name` (milsparse's own passes load on first use)."""
    if name not in MILSPARSE_PASSES:
        import milsparse.passes

        milsparse.passes.load()
    try:
        return MILSPARSE_PASSES[name]
    except KeyError:
        known = ", ".join(sorted(MILSPARSE_PASSES))
        raise PipelineError(f"unknown milsparse pass {name!r}; known: {known}") from None


def order_passes(names: Iterable[str], target: AvailableTarget | None = None) -> list[str]:
    """The requested passes in a valid order; passes whose declarations do not order them keep
    the order they were asked in. Raises PipelineError when no order exists."""
    names = list(dict.fromkeys(names))
    asked = {name: i for i, name in enumerate(names)}
    specs = {n: pass_spec(n) for n in names}
    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for name, spec in specs.items():
        for dep in spec.requires:
            if dep not in specs:
                raise PipelineError(f"{name} requires {dep}, which is not in the pipeline")
            graph.add_edge(dep, name)
        for other in spec.after:
            if other in specs:
                graph.add_edge(other, name)
        for other in spec.before:
            if other in specs:
                graph.add_edge(name, other)
        for other in spec.conflicts:
            if other in specs:
                raise PipelineError(
                    f"{name} conflicts with {other}; run them in separate pipelines"
                )
        if target is not None and target < spec.min_target:
            raise PipelineError(
                f"{name} needs minimum_deployment_target {spec.min_target.name} or later, "
                f"the pipeline targets {target.name}"
            )
    try:
        return list(nx.lexicographical_topological_sort(graph, key=asked.get))
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(u for u, _ in nx.find_cycle(graph))
        raise PipelineError(f"milsparse passes have an ordering loop: {cycle}") from None


def _copy_pipeline(base: ct.PassPipeline) -> ct.PassPipeline:
    pipeline = ct.PassPipeline(pass_names=list(base.passes), pipeline_name=str(base))
    for pass_name, options in base.get_all_options().items():
        pipeline.set_options(pass_name, {o.option_name: o.option_val for o in options})
    return pipeline


def place_in_pipeline(
    names: Iterable[str], base: ct.PassPipeline, options: dict[str, dict] | None = None
) -> ct.PassPipeline:
    """A copy of `base` with the milsparse passes inserted where their declarations allow.

    Each pass goes right after the last pass of `base` it must follow (its `after` list and the
    passes already placed before it), and must land before the first of its `before` passes.
    """
    pipeline = _copy_pipeline(base)
    passes = list(pipeline.passes)
    for name in order_passes(names):
        spec = pass_spec(name)
        anchors = [p for p in (*spec.after, *spec.requires) if p not in MILSPARSE_PASSES]
        if anchors and not any(p in passes for p in anchors):
            warnings.warn(
                f"{name}: none of the passes it runs after ({', '.join(anchors)}) is in "
                f"pipeline {base}; it is placed at the start",
                PipelineWarning,
                stacklevel=2,
            )
        last_after = max(
            (i for i, p in enumerate(passes) if p in spec.after or p in spec.requires), default=-1
        )
        placed = [i for i, p in enumerate(passes) if p in MILSPARSE_PASSES]
        position = max([last_after] + placed) + 1
        first_before = min(
            (i for i, p in enumerate(passes) if p in spec.before), default=len(passes)
        )
        if position > first_before:
            raise PipelineError(
                f"{name} must run after {passes[position - 1]} and before {passes[first_before]}, "
                f"which comes earlier in pipeline {base}"
            )
        passes.insert(position, name)
    pipeline.passes = passes
    for name, opts in (options or {}).items():
        pipeline.set_options(name, opts)
    pipeline.validate()
    return pipeline


@dataclass(frozen=True)
class ChainStep:
    """One step of a chain to check: a display label (`"2 (palettize lut4)"`), its pass, and
    whether it selects every weight (no `op_names`), so that no weight keeps its old state."""

    label: str
    pass_name: str
    covers_all: bool = True


def _target_name(target: AvailableTarget) -> str:
    return target.name.replace("iOS", "ios")


def check_chain(
    steps: Iterable[ChainStep],
    target: AvailableTarget | None = None,
    start: Iterable[str] = ("dense",),
) -> list[tuple[ChainStep, list[tuple[str, str]]]]:
    """Follow the weight states through `steps`; return each step with the (consumed,
    produced) edges it takes. Raises PipelineError, naming the steps, when a step consumes
    none of the states the steps before it leave, or when every form it would produce needs a
    later target than `target` (None: not checked)."""
    states = {s: "the input" for s in start}  # state -> the step that made it
    taken = []
    for step in steps:
        spec = pass_spec(step.pass_name)
        if not spec.transforms:
            taken.append((step, []))
            continue
        consumed = [t for t in spec.transforms if t[0] in states]
        if not consumed:
            have = ", ".join(f"{s} (from {by})" for s, by in states.items())
            raise PipelineError(
                f"step {step.label} takes {' or '.join(spec.consumes)} weights, but the steps "
                f"before it leave them {have}: nothing it can work on (a quantized weight is not "
                "palettized; palettize first to quantize its table, or give the two steps "
                "different weights with op_names)"
            )
        allowed = [t for t in consumed if target is None or t[2] <= target]
        if not allowed:
            consumed_from, produced, needed = consumed[0]
            raise PipelineError(
                f"step {step.label} makes {consumed_from} weights {produced}, which needs "
                f"{needed.name}; the target is {target.name}: set the target to "
                f"{_target_name(needed)} (--target {_target_name(needed)}, or target: "
                f"{_target_name(needed)} in the recipe)"
            )
        edges = [(c, p) for c, p, _ in allowed]
        moved = {c for c, _ in edges}
        new = {s: by for s, by in states.items() if not (step.covers_all and s in moved)}
        for _, produced in edges:
            new[produced] = f"step {step.label}"
        states = new
        taken.append((step, edges))
    return taken


def chain_dot(taken, name: str = "chain") -> str:
    """Graphviz DOT text of a checked chain: weight states as nodes, one edge per state a step
    turns into another, labelled with the step."""
    graph = nx.MultiDiGraph()
    graph.add_node("dense")
    for step, edges in taken:
        for consumed, produced in edges:
            graph.add_edge(consumed, produced, label=step.label)
    lines = [f'digraph "{name}" {{', "  rankdir=LR;", "  node [shape=box];"]
    lines += [f'  "{n}";' for n in graph.nodes]
    lines += [f'  "{u}" -> "{v}" [label="{d["label"]}"];' for u, v, d in graph.edges(data=True)]
    lines.append("}")
    return "\n".join(lines)
