"""One report row per weight from several steps' rows (`passes.decisions.combine`)."""

from milsparse.passes.decisions import NOT_A_WEIGHT, WeightDecision, combine


def _row(reason=None, compressed=False, spec=None):
    return WeightDecision(
        name="fc_bias", consumers=("fc.bias",), shape=(64,), dtype="float16",
        compressed=compressed, reason=reason, spec=spec, dense_bytes=128, stored_bytes=128,
    )  # fmt: skip


def test_a_const_one_step_calls_not_a_weight_is_not_counted_as_a_weight():
    """Review finding: the steps' different reasons were joined as `prune: not a weight...;
    quantize: ...`, which no longer began with NOT_A_WEIGHT, so a bias counted as a weight."""
    bias = f"{NOT_A_WEIGHT}: read by linear.bias"
    (row,) = combine([("prune", [_row(bias)]), ("quantize", [_row("small: 64 <= min_size 2048")])])
    assert not row.is_weight and row.reason == bias
    (row,) = combine([("prune", [_row("1-D")]), ("quantize", [_row("small: 64")])])
    assert row.is_weight and row.reason == "prune: 1-D; quantize: small: 64"
