"""Every form the passes produce decodes exactly: milsparse's kernels (the weight chain's
decode, which runs the interpreter's constexpr kernels) and coremltools' own
`materialized_val_inference` give the same dense weight, over generated shapes, dtypes, steps
and options; the package saved to disk loads back with the same weights, and its weight file is
the byte accounting's size (header plus 64-byte aligned records; the file's last record is not
padded)."""

import tempfile
from pathlib import Path

import coremltools as ct
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from milsparse.fixtures import programs
from milsparse.ir import formats
from milsparse.ir.chain import Form, weight_chain

import milsparse as ms
from milsparse.recipe import Recipe, kind_of_text


def _heavy(rng, shape, dtype):
    w = rng.standard_t(3, shape) * 0.05
    w *= rng.lognormal(0, 0.7, (shape[0],) + (1,) * (len(shape) - 1))
    return w.astype(dtype)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    op_type = draw(st.sampled_from(["linear", "conv"]))
    out = draw(st.sampled_from([16, 32, 48, 64]))
    cin = draw(st.sampled_from([16, 24, 64, 96]))
    shape = (out, cin) if op_type == "linear" else (out, cin // 8, 3, 3)
    prune = draw(
        st.sampled_from(
            [
                None,
                "2:4",
                "1:4@out",
                "unstructured:0.3",
                "unstructured:0.75",
                "block2@out:0.5",
                "block4@out:0.6",
                "threshold:0.02",
            ]
        )  # fmt: skip
    )
    nbits = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    vector = draw(st.sampled_from([1, 1, 2, 4]))
    group = draw(st.sampled_from([None, 8, 16]))
    lut = f"lut{nbits}" + (f"x{vector}" if vector > 1 else "") + (f"@g{group}" if group else "")
    quant = draw(st.sampled_from(["int8", "uint8:affine", "int4@b8", "uint4@t", "int8@t:affine"]))
    second = draw(st.sampled_from([None, lut, quant]))
    steps = [s for s in (prune, second) if s is not None]
    if not steps:
        steps = [lut]
    if draw(st.booleans()) and len(steps) == 2:
        steps.reverse()  # compress first, then prune into the joint form
    seed = draw(st.integers(0, 2**16))
    return dtype, op_type, shape, steps, seed


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases())
def test_every_produced_form_decodes_like_coremltools_and_saves_as_accounted(case):
    dtype, op_type, shape, steps, seed = case
    weight = _heavy(np.random.default_rng(seed), shape, dtype)
    prog = programs.single_op(op_type, dtype=dtype, shape=shape, weight=weight)
    recipe = Recipe([{kind_of_text(s): {"spec": s, "min_size": 0}} for s in steps])
    ms.check_recipe(recipe, ct.target.iOS18)
    ms.run_passes(prog, [(s.pass_name, s.make_pass()) for s in recipe.steps])
    root = next(o for o in prog.functions["main"].operations if o.name == "weight")
    chain = weight_chain(root)
    ours = chain.decode()
    if chain.form is not Form.DENSE:
        theirs = np.asarray(root.materialized_val_inference())
        assert theirs.dtype == weight.dtype
        np.testing.assert_array_equal(ours, theirs.astype(np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "m.mlpackage")
        programs.program_to_mlmodel(prog).save(str(path))
        loaded = ms.load_program(path)
        again = next(o for o in loaded.functions["main"].operations if o.name == "weight")
        np.testing.assert_array_equal(weight_chain(again).decode(), ours)
        assert weight_chain(again).label == chain.label
        # the accounting of every const in the file (tensors of up to 9 elements are inlined
        # in the proto: they count their raw bytes there, not here)
        tensors = [
            t
            for op in loaded.functions["main"].operations
            if (c := weight_chain(op)) is not None
            for t in c.stored
            if t.count > formats.INLINE_MAX_ELEMENTS
        ]
        in_file = formats.BLOB_FILE_HEADER_BYTES + formats.stored_bytes(
            (t.count, t.bits) for t in tensors
        )
        blob = Path(path, "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
        assert in_file - 63 <= blob <= in_file
        rows = ms.inspect_model(path).rows
        assert sum(r.stored_bytes for r in rows) == sum(
            weight_chain(op).stored_bytes
            for op in loaded.functions["main"].operations
            if weight_chain(op) is not None
        )
