"""The typed weight state: every form is recognised, accounted to the byte, and decoded exactly."""

from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from milsparse.fixtures import programs
from milsparse.ir import formats
from milsparse.ir.chain import Form, weight_chain
from milsparse.ir.graph import walk_ops

import milsparse as ms

RNG = np.random.default_rng(0)
SHAPE = (48, 64)
N = SHAPE[0] * SHAPE[1]
MASK = RNG.random(SHAPE) < 0.4  # kept positions


def _uint(bits, values):
    return values.astype(np.uint8 if bits == 8 else getattr(types, f"np_uint{bits}_dtype"))


def dense():
    return mb.const(val=RNG.standard_normal(SHAPE).astype(np.float16), name="w")


def sparse_ios16():
    enc = formats.encode_sparse_ios16(RNG.standard_normal(SHAPE).astype(np.float16), MASK)
    return mb.constexpr_sparse_to_dense(
        nonzero_data=enc.nonzero_data, mask=enc.mask, shape=enc.shape, name="w"
    )


def lut_ios16():
    indices = RNG.integers(0, 4, N).astype(np.uint8)
    packed = np.packbits(
        np.unpackbits(indices[:, None], axis=1, bitorder="little")[:, :2].ravel(),
        bitorder="little",
    )
    lut = RNG.standard_normal(4).astype(np.float16)
    return mb.constexpr_lut_to_dense(
        lut=lut, indices=packed, shape=np.array(SHAPE, np.uint32), name="w"
    )


def affine_ios16():
    return mb.constexpr_affine_dequantize(
        quantized_data=RNG.integers(-128, 128, SHAPE).astype(np.int8),
        zero_point=np.int8(2),
        scale=RNG.uniform(0.01, 0.1, SHAPE[0]).astype(np.float16),
        axis=0,
        name="w",
    )


def sparse_ios18():
    enc = formats.encode_sparse_ios18(RNG.standard_normal(SHAPE).astype(np.float16), MASK)
    return mb.constexpr_sparse_to_dense(
        nonzero_data=enc.nonzero_data, mask=enc.mask.view(types.np_uint1_dtype), name="w"
    )


def lut_vector_ios18():
    # 4-bit palettes per group of 16 output channels, entries of 2 elements along axis 0
    indices = _uint(4, RNG.integers(0, 16, (24, 64)))
    lut = RNG.standard_normal((2, 1, 16, 2)).astype(np.float16)
    return mb.constexpr_lut_to_dense(indices=indices, lut=lut, vector_axis=0, name="w")


def int4_blockwise_ios18():
    data = RNG.integers(-8, 8, SHAPE).astype(types.np_int4_dtype)
    scale = RNG.uniform(0.01, 0.1, (SHAPE[0], SHAPE[1] // 32)).astype(np.float16)
    return mb.constexpr_blockwise_shift_scale(data=data, scale=scale, name="w")


def sparse_lut_ios18():
    mask = MASK.astype(np.uint8).view(types.np_uint1_dtype)
    nonzero = _uint(6, RNG.integers(0, 64, int(MASK.sum())))
    lut = RNG.standard_normal((1, 1, 64, 1)).astype(np.float16)
    m, nz = mb.constexpr_lut_to_sparse(indices_mask=mask, indices_nonzero_data=nonzero, lut=lut)
    return mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=m, name="w")


def sparse_uint8_ios18():
    mask = MASK.astype(np.uint8).view(types.np_uint1_dtype)
    nonzero = RNG.integers(0, 256, int(MASK.sum())).astype(np.uint8)
    scale = RNG.uniform(0.01, 0.1, (SHAPE[0], 1)).astype(np.float16)
    offset = RNG.integers(100, 150, (SHAPE[0], 1)).astype(np.uint8)
    m, nz = mb.constexpr_sparse_blockwise_shift_scale(
        data_mask=mask, nonzero_data=nonzero, scale=scale, offset=offset
    )
    return mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=m, name="w")


CASES = {
    # builder: (opset, form, label, nbits)
    dense: (ct.target.iOS16, Form.DENSE, "dense", None),
    sparse_ios16: (ct.target.iOS16, Form.SPARSE, "sparse(ios16)", None),
    lut_ios16: (ct.target.iOS16, Form.PALETTIZED, "lut2(ios16)", 2),
    affine_ios16: (ct.target.iOS16, Form.QUANTIZED, "int8", 8),
    sparse_ios18: (ct.target.iOS18, Form.SPARSE, "sparse", None),
    lut_vector_ios18: (ct.target.iOS18, Form.PALETTIZED, "lut4x2", 4),
    int4_blockwise_ios18: (ct.target.iOS18, Form.QUANTIZED, "int4", 4),
    sparse_lut_ios18: (ct.target.iOS18, Form.SPARSE_PALETTIZED, "sparse+lut6", 6),
    sparse_uint8_ios18: (ct.target.iOS18, Form.SPARSE_QUANTIZED, "sparse+uint8", 8),
}


@pytest.mark.parametrize("build", list(CASES), ids=[b.__name__ for b in CASES])
def test_every_form_is_read_accounted_and_decoded(build, tmp_path):
    opset, form, label, nbits = CASES[build]

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64), dtype=types.fp16)], opset_version=opset)
    def prog(x):
        return mb.linear(x=x, weight=build(), name="y")

    path = tmp_path / "m.mlpackage"
    programs.program_to_mlmodel(prog).save(str(path))
    loaded = ms.load_program(path)
    chains = {c.name: c for c in map(weight_chain, walk_ops(loaded.functions["main"])) if c}
    chain = chains["w"]  # beside linear's own zero bias
    assert (chain.form, chain.label, chain.nbits) == (form, label, nbits)
    assert chain.name == "w" and chain.shape == SHAPE and chain.dtype == "fp16"
    assert chain.form.sparse == ("sparse" in label)
    if chain.form.sparse:
        assert chain.sparsity == pytest.approx(1 - MASK.mean())
    # every stored tensor of 10 or more elements is in the weight file, to the byte but for the
    # alignment padding after the last one
    blob = Path(path, "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    stored = [t for c in chains.values() for t in c.stored]
    big = [(t.count, t.bits) for t in stored if t.count > formats.INLINE_MAX_ELEMENTS]
    accounted = formats.BLOB_FILE_HEADER_BYTES + formats.stored_bytes(big)
    assert 0 <= accounted - blob < formats.BLOB_ALIGNMENT  # the file's last record is unpadded
    assert chain.stored_bytes < chain.dense_bytes or form is Form.DENSE
    # decoded exactly as coremltools decodes it
    root = chain.op
    theirs = root.outputs[0].val if form is Form.DENSE else _materialized(root)
    np.testing.assert_array_equal(chain.decode(), np.asarray(theirs).astype(np.float32))


def _materialized(op):
    """coremltools' own decompression of a constexpr chain."""
    values = op.materialized_val_inference()
    return values[-1] if isinstance(values, tuple) else values


def test_consts_inside_a_chain_and_small_or_unread_consts_are_not_weights():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64))], opset_version=ct.target.iOS18)
    def prog(x):
        w = sparse_ios18()
        return mb.add(x=mb.linear(x=x, weight=w), y=np.ones(3, np.float32).sum())

    ops = list(walk_ops(prog.functions["main"]))
    chains = [c for c in map(weight_chain, ops) if c is not None]
    # the sparse weight and linear's own zero bias; not the chain's operands, not the scalar
    assert sorted(c.name for c in chains) == ["linear_0_bias_0", "w"]
    assert [c.form for c in chains] == [Form.SPARSE, Form.DENSE]
    inner = [op for op in ops if op.op_type == "const" and op.name.startswith("w_")]
    assert all(weight_chain(op) is None for op in inner)
