import coremltools as ct
import pytest
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
from milsparse.passes import registry
from milsparse.passes.registry import PassSpec, order_passes, place_in_pipeline

import milsparse as ms
from milsparse.errors import PipelineError


class _Noop(AbstractGraphPass):
    def apply(self, prog):
        pass


@pytest.fixture
def fake_passes():
    """Register throwaway milsparse passes; remove them (and only them) afterwards."""
    added = []

    def add(name, **kwargs):
        PASS_REGISTRY.passes[name] = _Noop
        registry.register(PassSpec(name=name, summary="test", **kwargs))
        added.append(name)
        return name

    yield add
    for name in added:
        PASS_REGISTRY.passes.pop(name, None)
        registry.MILSPARSE_PASSES.pop(name, None)


def test_requires_after_and_before_order_the_passes(fake_passes):
    a = fake_passes("milsparse::t_a")
    b = fake_passes("milsparse::t_b", requires=(a,))
    c = fake_passes("milsparse::t_c", before=(a,))
    d = fake_passes("milsparse::t_d", after=("milsparse::t_absent",))
    assert order_passes([b, a, c, d]) == [c, a, b, d]


def test_ties_are_ordered_by_name(fake_passes):
    names = [fake_passes(f"milsparse::t_{x}") for x in "zyx"]
    assert order_passes(names) == sorted(names)


def test_a_loop_is_reported_with_its_cycle(fake_passes):
    a = fake_passes("milsparse::t_a", after=("milsparse::t_b",))
    b = fake_passes("milsparse::t_b", after=("milsparse::t_a",))
    with pytest.raises(
        PipelineError,
        match="ordering loop: milsparse::t_(a -> milsparse::t_b|b -> milsparse::t_a)",
    ):
        order_passes([a, b])


def test_missing_requirement_conflict_and_target_are_errors(fake_passes):
    a = fake_passes("milsparse::t_a")
    b = fake_passes("milsparse::t_b", requires=(a,))
    c = fake_passes("milsparse::t_c", conflicts=(a,))
    e = fake_passes("milsparse::t_e", min_target=AvailableTarget.iOS18)
    with pytest.raises(PipelineError, match="requires milsparse::t_a"):
        order_passes([b])
    with pytest.raises(PipelineError, match="conflicts with milsparse::t_a"):
        order_passes([a, c])
    with pytest.raises(PipelineError, match="needs minimum_deployment_target iOS18"):
        order_passes([e], target=AvailableTarget.iOS16)
    with pytest.raises(PipelineError, match="unknown milsparse pass"):
        order_passes(["milsparse::nope"])


def test_prune_lands_after_weight_fusions_and_fp16_cast_in_the_default_pipeline():
    pipeline = ms.coreml_pipeline("2:4")
    passes = pipeline.passes
    i = passes.index("milsparse::prune")
    for anchor in (
        "common::fuse_conv_batchnorm",
        "common::add_fp16_cast",
        "common::fuse_linear_bias",
    ):
        assert max(j for j, p in enumerate(passes) if p == anchor) < i
    last_const_elim = max(j for j, p in enumerate(passes) if p == "common::const_elimination")
    assert last_const_elim < i
    # the base pipeline is copied, not changed
    assert "milsparse::prune" not in ct.PassPipeline.DEFAULT.passes
    assert pipeline.get_options("milsparse::prune")[0].option_name == "config"


def test_placing_into_an_empty_pipeline_and_a_before_violation(fake_passes):
    assert ms.coreml_pipeline("2:4", base=ct.PassPipeline.EMPTY).passes == ["milsparse::prune"]
    late = fake_passes(
        "milsparse::t_late",
        after=("common::dead_code_elimination",),
        before=("common::const_elimination",),
    )
    base = ct.PassPipeline(["common::const_elimination", "common::dead_code_elimination"], "t")
    with pytest.raises(PipelineError, match="must run after common::dead_code_elimination"):
        place_in_pipeline([late], base)


def test_registering_outside_the_namespace_or_unregistered_is_refused():
    with pytest.raises(PipelineError, match="namespace"):
        registry.register(PassSpec(name="common::x", summary=""))
    with pytest.raises(PipelineError, match="not registered"):
        registry.register(PassSpec(name="milsparse::not_there", summary=""))
