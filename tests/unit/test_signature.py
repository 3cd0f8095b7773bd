"""ModelSignature.check: a request is checked against the model before it is queued,
and every refusal names the input and says what the model expects."""

import numpy as np
import pytest

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.signature import ModelSignature, TensorSpec
from batchgate.core.types import DATATYPES, InferRequest, Tensor


def sig(max_batch_size=8):
    return ModelSignature(
        name="clf",
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        inputs=(
            TensorSpec("image", DATATYPES["FP32"], (3, -1)),
            TensorSpec("mask", DATATYPES["BOOL"], (4,)),
            TensorSpec("hint", DATATYPES["INT64"], (1,), optional=True),
        ),
        outputs=(
            TensorSpec("scores", DATATYPES["FP32"], (10,)),
            TensorSpec("label", DATATYPES["BYTES"], (1,)),
        ),
    )


def t(name, datatype, shape):
    data = np.zeros(shape, dtype=DATATYPES[datatype].np_dtype)
    return Tensor(name, datatype, tuple(shape), data)


def good_inputs(batch=2):
    return [t("image", "FP32", (batch, 3, 5)), t("mask", "BOOL", (batch, 4))]


def req(inputs, outputs=None):
    return InferRequest("clf", "", inputs, outputs)


def refused(signature, request):
    with pytest.raises(GatewayError) as ei:
        signature.check(request)
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT
    return ei.value.message


def test_valid_request_gives_feeds_outputs_and_batch():
    inputs = good_inputs(3)
    checked = sig().check(req(inputs))
    assert set(checked.feeds) == {"image", "mask"}
    assert checked.feeds["image"] is inputs[0].data
    assert checked.output_names == ("scores", "label")
    assert checked.batch_size == 3


def test_requested_outputs_keep_request_order():
    checked = sig().check(req(good_inputs(), ["label", "scores"]))
    assert checked.output_names == ("label", "scores")


def test_optional_input_may_be_given_or_omitted():
    inputs = good_inputs(2) + [t("hint", "INT64", (2, 1))]
    assert set(sig().check(req(inputs)).feeds) == {"image", "mask", "hint"}


def test_wrong_input_name():
    msg = refused(sig(), req(good_inputs() + [t("imgae", "FP32", (2, 3, 5))]))
    assert "'imgae'" in msg
    assert "model 'clf'" in msg
    assert "'image'" in msg and "'mask'" in msg  # lists what it has


def test_wrong_datatype():
    inputs = [t("image", "FP64", (2, 3, 5)), t("mask", "BOOL", (2, 4))]
    msg = refused(sig(), req(inputs))
    assert "'image'" in msg
    assert "FP64" in msg and "FP32" in msg


def test_wrong_rank():
    inputs = [t("image", "FP32", (3, 5)), t("mask", "BOOL", (2, 4))]
    msg = refused(sig(), req(inputs))
    assert "'image'" in msg
    assert "[3, 5]" in msg
    assert "[-1, 3, -1]" in msg


def test_wrong_fixed_dimension():
    inputs = [t("image", "FP32", (2, 3, 5)), t("mask", "BOOL", (2, 5))]
    msg = refused(sig(), req(inputs))
    assert "'mask'" in msg
    assert "[2, 5]" in msg
    assert "[-1, 4]" in msg


def test_dynamic_dimension_accepts_any_size():
    inputs = [t("image", "FP32", (1, 3, 17)), t("mask", "BOOL", (1, 4))]
    assert sig().check(req(inputs)).batch_size == 1


@pytest.mark.parametrize("batch", [0, 9])
def test_batch_out_of_range(batch):
    msg = refused(sig(max_batch_size=8), req(good_inputs(batch)))
    assert "'image'" in msg
    assert f"batch size {batch}" in msg
    assert "1 and 8" in msg


def test_batch_at_max_is_accepted():
    assert sig(max_batch_size=8).check(req(good_inputs(8))).batch_size == 8


def test_inconsistent_batch_across_inputs():
    inputs = [t("image", "FP32", (2, 3, 5)), t("mask", "BOOL", (3, 4))]
    msg = refused(sig(), req(inputs))
    assert "'mask'" in msg
    assert "3" in msg and "2" in msg
    assert "batch" in msg


def test_missing_input():
    msg = refused(sig(), req([t("image", "FP32", (2, 3, 5))]))
    assert "'mask'" in msg
    assert "model 'clf'" in msg
    assert "'hint'" not in msg  # optional inputs are not demanded


def test_missing_inputs_plural():
    msg = refused(sig(), req([]))
    assert "'image'" in msg and "'mask'" in msg


def test_duplicate_input():
    inputs = good_inputs() + [t("mask", "BOOL", (2, 4))]
    msg = refused(sig(), req(inputs))
    assert "'mask'" in msg
    assert "more than once" in msg


def test_unknown_requested_output():
    msg = refused(sig(), req(good_inputs(), ["scores", "probs"]))
    assert "'probs'" in msg
    assert "'scores'" in msg and "'label'" in msg


# --- a model that does not batch: shapes are the dims, no batch dimension
def nobatch():
    return ModelSignature(
        name="fixed",
        platform="onnxruntime_onnx",
        max_batch_size=0,
        inputs=(TensorSpec("x", DATATYPES["INT32"], (2, -1)),),
        outputs=(TensorSpec("y", DATATYPES["INT32"], (2, -1)),),
    )


def test_no_batching_accepts_shape_equal_to_dims():
    checked = nobatch().check(InferRequest("fixed", "", [t("x", "INT32", (2, 7))]))
    assert checked.batch_size == 1
    assert checked.output_names == ("y",)


def test_no_batching_refuses_an_added_batch_dimension():
    msg = refused(nobatch(), InferRequest("fixed", "", [t("x", "INT32", (1, 2, 7))]))
    assert "'x'" in msg
    assert "[1, 2, 7]" in msg
    assert "[2, -1]" in msg


def test_no_batching_wrong_fixed_dim():
    msg = refused(nobatch(), InferRequest("fixed", "", [t("x", "INT32", (3, 7))]))
    assert "'x'" in msg
    assert "[2, -1]" in msg


def test_full_shape():
    spec = TensorSpec("x", DATATYPES["FP32"], (3, 4))
    assert spec.full_shape(0) == [3, 4]
    assert spec.full_shape(16) == [-1, 3, 4]


def test_a_remembered_layout_gives_the_same_verdict_and_fresh_feeds():
    s = sig()
    first = s.check(req(good_inputs(2)))
    again_inputs = good_inputs(2)
    again = s.check(req(again_inputs))
    assert again.batch_size == first.batch_size == 2
    assert again.output_names == ("scores", "label")
    assert again.feeds["image"] is again_inputs[0].data  # this request's own data, not the first one's
    # A different layout is checked in full, even after a good one was remembered.
    with pytest.raises(GatewayError) as e:
        s.check(req([t("image", "FP32", (2, 4, 5)), t("mask", "BOOL", (2, 4))]))
    assert e.value.code is ErrorCode.INVALID_ARGUMENT and "image" in e.value.message
    # A requested-output subset on a remembered layout is still checked.
    with pytest.raises(GatewayError):
        s.check(req(good_inputs(2), ["nope"]))
    assert s.check(req(good_inputs(2), ["label"])).output_names == ("label",)


def test_an_open_signature_forwards_any_request_and_groups_only_alike_batchable_ones():
    """A model whose upstream declares no tensors: nothing is checked but what batching needs."""
    open_sig = ModelSignature("up", "remote", 4, (), (), open=True)
    a = open_sig.check(req([t("x", "FP32", (2, 3)), t("ids", "INT64", (2,))]))
    assert set(a.feeds) == {"x", "ids"} and a.output_names == () and a.batch_size == 2  # () = every output
    same = open_sig.check(req([t("ids", "INT64", (1,)), t("x", "FP32", (1, 3))]))
    assert same.group == a.group  # input order does not matter; rows do not either
    others = [
        req([t("x", "FP32", (2, 4)), t("ids", "INT64", (2,))]),  # another non-batch shape
        req([t("x", "FP64", (2, 3)), t("ids", "INT64", (2,))]),  # another datatype
        req([t("x", "FP32", (2, 3)), t("ids", "INT64", (2,))], outputs=["out_x"]),  # other outputs asked
        req([t("x", "FP32", (2, 3)), t("other", "INT64", (2,))]),  # other names
    ]
    for r in others:
        assert open_sig.check(r).group != a.group
    # Not batchable: sent alone (a group of its own), whatever it holds.
    for r in (
        req([t("x", "FP32", (2, 3)), t("ids", "INT64", (1,))]),  # first dimensions differ
        req([t("x", "FP32", (5, 3))]),  # more rows than the batch size
        req([t("x", "FP32", ())]),  # a scalar
    ):
        c = open_sig.check(r)
        assert c.batch_size == 1 and c.group != open_sig.check(r).group
    # A model that does not batch: every request alone.
    unbatched = ModelSignature("up", "remote", 0, (), (), open=True)
    one = req([t("x", "FP32", (1, 3))])
    assert unbatched.check(one).group != unbatched.check(one).group
    with pytest.raises(GatewayError) as e:
        open_sig.check(req([t("x", "FP32", (1, 3)), t("x", "FP32", (1, 3))]))
    assert e.value.code is ErrorCode.INVALID_ARGUMENT and "appears more than once" in e.value.message
