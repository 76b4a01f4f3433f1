"""Recipes with steps: reading them, checking them as a chain, the bundled examples, the CLI's
step flags, and `milsparse passes --recipe`."""

import json
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from milsparse.fixtures import programs
from milsparse.ir import formats
from milsparse.ir.chain import weight_chain

import milsparse as ms
from milsparse.cli import main
from milsparse.errors import ConfigError, PipelineError
from milsparse.recipe import Recipe, Step

RECIPES = Path(programs.__file__).parent / "recipes"


@pytest.fixture
def block16(save_program):
    """An fp16 transformer block saved for iOS16 (the bundled recipes raise it to iOS18)."""
    prog = programs.transformer_block(
        d_model=128, heads=4, d_ff=256, dtype=np.float16, opset=ct.target.iOS16
    )
    return save_program(prog, "block16.mlpackage")


def _formats(model) -> dict[str, str]:
    return {r.name: r.format for r in ms.inspect_model(model).rows if r.name.endswith("weight")}


# -- reading -----------------------------------------------------------------------------------
def test_the_one_step_format_and_the_steps_format_read_alike():
    old = Recipe.from_yaml("prune:\n  spec: '2:4'\n  min_size: 16\ntarget: ios18\n")
    new = Recipe.from_yaml("target: ios18\nsteps:\n  - prune: {spec: '2:4', min_size: 16}\n")
    assert old == new and [s.kind for s in old.steps] == ["prune"]
    assert old.prune.spec.to_string() == "2:4"
    both = Recipe.from_yaml("steps:\n  - palettize: lut4x2@g16\n  - prune: block2@out:0.5\n")
    assert [s.describe() for s in both.steps] == ["palettize lut4x2@g16", "prune block2@out:0.5"]
    assert Recipe.from_yaml(both.to_yaml()) == both
    assert Recipe.coerce(["2:4", "int4@b32"]).steps == (
        Step("prune", "2:4"),
        Step("quantize", "int4@b32"),
    )
    assert Recipe.coerce("lut6").steps[0].kind == "palettize"
    assert Recipe.coerce({"spec": "2:4"}).prune is not None  # a bare prune config mapping
    sections = Recipe.from_dict({"quantize": "int8", "prune": "2:4"})  # in the order written
    assert [s.kind for s in sections.steps] == ["quantize", "prune"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": [{"prune": "2:4"}], "prune": "2:4"}, "either 'steps' or top-level"),
        ({"steps": "2:4"}, "'steps' must be a list"),
        ({"steps": []}, "at least one step"),
        ({"steps": [{"prune": "2:4"}, {"prune": "1:2"}]}, "prune appears more than once"),
        ({"steps": [{"sparsify": "2:4"}]}, r"step 1: a step is a mapping with one key"),
        ({"steps": [{"palettize": "lut5"}]}, "nbits"),
        ({"steps": [{"quantize": {"spec": "int8", "op_types": ["LINEAR"]}}]}, "did you mean"),
        ({"target": "ios18"}, "a recipe needs 'steps'"),
        ({"steps": [{"prune": "2:4"}], "extra": 1}, "unknown recipe keys"),
    ],
)
def test_bad_recipes_are_refused_with_what_is_wrong(data, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)


# -- the chain ---------------------------------------------------------------------------------
def test_chain_errors_name_the_steps():
    with pytest.raises(PipelineError, match=r"step 2 \(palettize lut4\) takes dense or sparse"):
        ms.check_recipe(Recipe(["int8", "lut4"]))
    with pytest.raises(PipelineError, match=r"quantized \(from step 1 \(quantize int8\)\)"):
        ms.check_recipe(Recipe(["int8", "lut4"]))
    # palettize, then quantize the table (iOS18)
    taken = ms.check_recipe(Recipe(["lut4", "int8@t"]), ct.target.iOS18)
    assert taken[-1][1] == [("palettized", "palettized")]
    with pytest.raises(PipelineError, match=r"step 2 \(quantize int8@t\) makes palettized "
                       r"weights palettized, which needs iOS18"):  # fmt: skip
        ms.check_recipe(Recipe(["lut4", "int8@t"]), ct.target.iOS16)
    with pytest.raises(
        PipelineError,
        match=r"step 2 \(palettize lut4\) makes sparse weights sparse\+palettized, which needs "
        r"iOS18; the target is iOS16: set the target to ios18",
    ):
        ms.check_recipe(Recipe(["2:4", "lut4"]), ct.target.iOS16)
    with pytest.raises(PipelineError, match=r"step 1 \(prune 2:4\) makes palettized weights"):
        ms.check_recipe(Recipe(["2:4"]), ct.target.iOS17, start={"palettized"})
    # different weights: palettize some, quantize the others
    steps = [
        {"palettize": {"spec": "lut4", "op_names": ["ff*"]}},
        {"quantize": {"spec": "int8", "op_names": ["attn*"]}},
    ]
    taken = ms.check_recipe(Recipe(steps), ct.target.iOS16)
    assert [edges for _, edges in taken] == [[("dense", "palettized")], [("dense", "quantized")]]
    # both orders of the joint forms
    for order in (["2:4", "lut4"], ["lut4", "2:4"], ["2:4", "int8"], ["int8", "2:4"]):
        taken = ms.check_recipe(Recipe(order), ct.target.iOS18)
        assert taken[-1][1][-1][1] in ("sparse+palettized", "sparse+quantized")


def test_a_joint_step_on_an_ios16_model_is_refused_and_writes_nothing(block16, tmp_path):
    out = tmp_path / "out.mlpackage"
    with pytest.raises(PipelineError, match=r"step 2 \(palettize lut4\).*set the target to ios18"):
        ms.compress(block16, ["2:4", "lut4"], output=out)
    assert not out.exists()
    code = main(["compress", str(block16), "-o", str(out), "--prune", "2:4", "--palettize", "4"])
    assert code == 2 and not out.exists()
    assert list(tmp_path.iterdir()) == [block16]  # no temporary package left either


# -- the bundled recipes -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected, bits",
    [
        ("prune-2of4-lut4", "sparse+lut4", 3.0),
        ("prune50-int8", "sparse+int8", 5.0),
        ("int4-block", "int4", 4.5),
        ("lut6", "lut6(ios16)", 6.0),  # no target: the iOS16 form
    ],
)
def test_bundled_recipes(block16, tmp_path, name, expected, bits):
    path = RECIPES / f"{name}.yaml"
    recipe = Recipe.from_yaml(path)
    out = tmp_path / f"{name}.mlpackage"
    model, report = ms.compress_with_report(block16, recipe, output=out)
    got = _formats(out)
    assert set(got.values()) == {expected}, got
    inspect = ms.inspect_model(out)
    rows = [r for r in inspect.rows if r.name.endswith("weight")]
    per_weight = sum(r.stored_bytes for r in rows) * 8 / sum(r.num_elements for r in rows)
    assert per_weight == pytest.approx(bits, abs=0.35)
    # the file holds what the accounting says (within 1%), and decodes as the report says
    blob = (out / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    accounted = formats.BLOB_FILE_HEADER_BYTES + sum(r.stored_bytes for r in inspect.rows)
    assert accounted * 0.99 <= blob <= accounted
    assert report.totals()["stored_bytes"] == sum(r.stored_bytes for r in inspect.rows)
    verdict = ms.verify(block16, out, samples=2)
    assert verdict.weights and all(w.pattern_holds is not False for w in verdict.weights)
    assert {w.format for w in verdict.weights if w.name.endswith("weight")} == {expected}
    assert all(np.isfinite(o.snr_db) for o in verdict.outputs)


def test_every_weight_of_a_joint_recipe_keeps_the_pruned_pattern(block16, tmp_path):
    pruned = ms.compress(block16, "2:4", target="ios18")
    joint = ms.compress(block16, ["2:4", "lut4"], target="ios18")
    before = {r.name: r for r in ms.inspect_model(pruned).rows}
    dense_prog, joint_prog = ms.load_program(pruned), ms.load_program(joint)
    for op in joint_prog.functions["main"].operations:
        chain = weight_chain(op)
        if chain is None or not op.name.endswith("weight"):
            continue
        ref = next(o for o in dense_prog.functions["main"].operations if o.name == op.name)
        np.testing.assert_array_equal(chain.decode() == 0, weight_chain(ref).decode() == 0)
        assert before[op.name].format == "sparse"


# -- the CLI -----------------------------------------------------------------------------------
def test_cli_step_flags_run_in_the_order_given(block16, tmp_path, capsys):
    a, b = tmp_path / "a.mlpackage", tmp_path / "b.mlpackage"
    args = ["--target", "ios18", "--json"]
    assert (
        main(["compress", str(block16), "-o", str(a), "--prune", "2:4", "--palettize", "4", *args])
        == 0
    )
    first = json.loads(capsys.readouterr().out)
    assert {w["spec"] for w in first["weights"] if w["compressed"]} == {"2:4 + lut4"}
    assert (
        main(["compress", str(block16), "-o", str(b), "--palettize", "4", "--prune", "2:4", *args])
        == 0
    )
    second = json.loads(capsys.readouterr().out)
    assert {w["spec"] for w in second["weights"] if w["compressed"]} == {"lut4 + 2:4"}
    assert set(_formats(a).values()) == set(_formats(b).values()) == {"sparse+lut4"}


@pytest.mark.parametrize(
    "flags, spec, label",
    [
        (["--palettize", "2", "--lut-group-size", "32"], "lut2@g32", "lut2"),
        (["--palettize", "4", "--cluster-dim", "2"], "lut4x2", "lut4x2"),
        (["--palettize", "lut3:uniform"], "lut3:uniform", "lut3"),
        (["--palettize", "6", "--lut-mode", "uniform"], "lut6:uniform", "lut6"),
        (
            ["--quantize", "int4", "--quant-granularity", "block", "--block-size", "16"],
            "int4@b16",
            "int4",
        ),
        (["--quantize", "uint8", "--quant-mode", "affine"], "uint8:affine", "uint8"),
        (["--quantize", "int8", "--quant-granularity", "tensor"], "int8@t", "int8"),
    ],
)
def test_cli_palettize_and_quantize_options(block16, tmp_path, capsys, flags, spec, label):
    out = tmp_path / "o.mlpackage"
    code = main(["compress", str(block16), "-o", str(out), "--target", "ios18", "--json", *flags])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert {w["spec"] for w in report["weights"] if w["compressed"]} == {spec}
    assert set(_formats(out).values()) == {label}
    loose = ["--verify", "--min-snr", "0", "--min-cosine", "0"]
    verified = tmp_path / "v.mlpackage"
    assert (
        main(["compress", str(block16), "-o", str(verified), "--target", "ios18", *loose, *flags])
        == 0
    )
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "give --prune, --palettize, --quantize"),
        (["--prune", "2:4", "--lut-mode", "uniform"], "--lut-mode applies with --palettize only"),
        (["--palettize", "4", "--block-size", "16"], "--block-size applies with --quantize only"),
        (["--quantize", "int4", "--block-size", "16"], "--block-size applies with"),
        (["--palettize", "4", "--scope", "channel"], "apply to a prune step"),
        (["--palettize", "5"], "nbits"),
        (["--quantize", "int3"], "bad quantize spec"),
        (["--palettize", "4", "--cluster-dim", "2", "--lut-mode", "uniform"], "needs mode kmeans"),
    ],
)
def test_cli_bad_step_flags_exit_2(block16, tmp_path, capsys, flags, message):
    out = tmp_path / "o.mlpackage"
    assert main(["compress", str(block16), "-o", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_recipe_and_step_flags_are_exclusive(block16, tmp_path, capsys):
    recipe = RECIPES / "lut6.yaml"
    out = tmp_path / "o.mlpackage"
    assert (
        main(["compress", str(block16), "-o", str(out), "--recipe", str(recipe), "--prune", "2:4"])
        == 2
    )
    assert "--recipe or step flags (--prune), not both" in capsys.readouterr().err


def test_passes_prints_a_recipes_chain(capsys):
    recipe = str(RECIPES / "prune-2of4-lut4.yaml")
    assert main(["passes", "--recipe", recipe, "--dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith('digraph "prune-2of4-lut4" {')
    assert '"dense" -> "sparse" [label="1 (prune 2:4)"];' in dot
    assert '"sparse" -> "sparse+palettized" [label="2 (palettize lut4)"];' in dot
    assert main(["passes", "--recipe", recipe, "--target", "ios16"]) == 2
    assert "set the target to ios18" in capsys.readouterr().err
    assert main(["passes", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert ["sparse", "sparse+palettized", "iOS18"] in listed["milsparse::palettize"]["transforms"]
    assert main(["passes", "--dot"]) == 2


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "latin-1"])
def test_a_recipe_that_is_not_utf8_is_a_user_error(block16, tmp_path, capsys, encoding):
    """Finding 12: a UTF-16 recipe exited 3 (UnicodeDecodeError) in `compress --recipe` and
    `passes --recipe`; it is exit 2, saying the recipe must be UTF-8 text."""
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("# Prüfung\nsteps:\n  - prune: '2:4'\n".encode(encoding))
    with pytest.raises(ConfigError, match="must be UTF-8 text"):
        Recipe.from_yaml(recipe)
    out = tmp_path / "o.mlpackage"
    for args in (["compress", str(block16), "-o", str(out), "--recipe", str(recipe)],
                 ["passes", "--recipe", str(recipe)]):  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{recipe}: the recipe must be UTF-8 text" in err and err.count("\n") == 1
    assert not out.exists()
    recipe.write_bytes("steps:\n  - prune: '2:4'\n".encode(encoding))  # ASCII in UTF-16: NULs
    if encoding.startswith("utf-16"):
        with pytest.raises(ConfigError, match="must be UTF-8 text"):
            Recipe.from_yaml(recipe)
    recipe.write_bytes("# Prüfung\nsteps:\n  - prune: '2:4'\n".encode("utf-8-sig"))
    assert Recipe.from_yaml(recipe).steps[0].kind == "prune"  # a BOM is fine
