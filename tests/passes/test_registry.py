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


def test_passes_the_declarations_do_not_order_keep_the_order_asked(fake_passes):
    names = [fake_passes(f"milsparse::t_{x}") for x in "zyx"]
    assert order_passes(names) == names
    assert order_passes(names[::-1]) == names[::-1]
    # milsparse's own passes: both orders of prune and palettize are valid (the joint form
    # either way), so the order asked is the order run, whatever the names' order
    for asked in (["prune", "palettize", "quantize"], ["quantize", "palettize", "prune"]):
        names = [f"milsparse::{n}" for n in asked]
        assert order_passes(names) == names


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
    with pytest.warns(registry.PipelineWarning, match="common::fuse_conv_batchnorm.*placed at"):
        pipeline = ms.coreml_pipeline("2:4", base=ct.PassPipeline.EMPTY)
    assert pipeline.passes == ["milsparse::prune"]
    late = fake_passes(
        "milsparse::t_late",
        after=("common::dead_code_elimination",),
        before=("common::const_elimination",),
    )
    base = ct.PassPipeline(["common::const_elimination", "common::dead_code_elimination"], "t")
    with pytest.raises(PipelineError, match="must run after common::dead_code_elimination"):
        place_in_pipeline([late], base)


def test_bad_names_unregistered_classes_and_duplicates_are_refused(fake_passes):
    with pytest.raises(PipelineError, match="namespace::name"):
        registry.register(PassSpec(name="nonamespace", summary=""))
    with pytest.raises(PipelineError, match="not registered"):
        registry.register(PassSpec(name="mytools::not_there", summary=""))
    a = fake_passes("mytools::t_a")
    with pytest.raises(PipelineError, match="already registered"):
        registry.register(PassSpec(name=a, summary=""))
    with pytest.raises(PipelineError, match="already registered"):
        registry.graph_pass("milsparse::prune", "again")(_Noop)


def test_graph_pass_registers_in_any_namespace_in_one_step():
    try:

        @registry.graph_pass("t_tools::scale", "a pass of someone else's",
                             before=("milsparse::prune",))  # fmt: skip
        class Scale(AbstractGraphPass):
            def apply(self, prog):
                pass

        assert isinstance(PASS_REGISTRY["t_tools::scale"], Scale)
        assert order_passes(["milsparse::prune", "t_tools::scale"]) == [
            "t_tools::scale",
            "milsparse::prune",
        ]
    finally:
        PASS_REGISTRY.passes.pop("t_tools::scale", None)
        registry.MILSPARSE_PASSES.pop("t_tools::scale", None)


def test_the_readme_example_of_a_pass_of_your_own_runs():
    """The worked example of docs/toolchain.md, executed as it stands there."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "docs" / "toolchain.md").read_text()
    code = re.search(r"<!-- own-pass -->\n```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), scope)
        assert scope["order"] == ["mytools::clip_weights", "milsparse::prune"]
        passes = scope["pipeline"].passes
        assert passes.index("mytools::clip_weights") < passes.index("milsparse::prune")
        assert scope["before"] > 0.1 and scope["clipped"] == pytest.approx(0.1)
    finally:
        PASS_REGISTRY.passes.pop("mytools::clip_weights", None)
        registry.MILSPARSE_PASSES.pop("mytools::clip_weights", None)
