"""anomaly.export.rewrite: each rewritten graph computes what tf2onnx's did.

Small graphs built here with random weights and odd sizes (channel counts that are not
onnxruntime's block of 16, a 5x3 input, no bias), run by onnxruntime before and after the
rewrite; and the conv models' real exports, which keep no ConvTranspose.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402  (after the skips)

from anomaly.export.rewrite import rewrite  # noqa: E402

RNG = np.random.default_rng(0)


def _model(nodes, inputs, output, consts):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _deconv(x, y, cin, cout, bias=True):
    consts = {f"{y}_w": RNG.normal(0, 0.3, (cin, cout, 3, 3))}
    if bias:
        consts[f"{y}_b"] = RNG.normal(0, 0.3, cout)
    node = helper.make_node("ConvTranspose", [x, *consts], [y], strides=[2, 2],
                            kernel_shape=[3, 3], pads=[0, 0, 1, 1])
    return node, consts


def _same(model, x, atol=1e-5):
    want = _run(model, x)
    rewritten = rewrite(model)
    got = _run(rewritten, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
    return rewritten


@pytest.mark.parametrize("logit_channels", [1, 3])
def test_deconv_into_a_small_conv_is_computed_on_the_parity_maps(logit_channels):
    deconv, consts = _deconv("x", "d", 7, 5)
    consts["l_w"] = RNG.normal(0, 0.3, (logit_channels, 5, 3, 3))
    consts["l_b"] = RNG.normal(0, 0.3, logit_channels)
    nodes = [deconv, helper.make_node("Relu", ["d"], ["r"]),
             helper.make_node("Conv", ["r", "l_w", "l_b"], ["y"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1])]
    model = _model(nodes, [("x", [None, 7, 5, 3])], "y", consts)
    x = RNG.uniform(-1, 1, (4, 7, 5, 3)).astype(np.float32)
    ops = _ops(_same(model, x))
    assert "ConvTranspose" not in ops and ops.count("DepthToSpace") == 1


def test_deconvs_in_a_row_are_interleaved_in_nhwc():
    first, consts = _deconv("x", "d1", 6, 9)
    second, more = _deconv("r1", "y", 9, 4, bias=False)  # no ReLU after it, no bias
    nodes = [first, helper.make_node("Relu", ["d1"], ["r1"]), second]
    model = _model(nodes, [("x", [None, 6, 3, 4])], "y", {**consts, **more})
    x = RNG.uniform(-1, 1, (3, 6, 3, 4)).astype(np.float32)
    ops = _ops(_same(model, x))
    assert "ConvTranspose" not in ops and "DepthToSpace" not in ops
    assert ops.count("Conv") == 8


def test_a_dense_layer_is_permuted_instead_of_transposed():
    deconv, consts = _deconv("t", "y", 8, 3)
    consts.update(w=RNG.normal(0, 0.3, (5, 2 * 3 * 8)), b=RNG.normal(0, 0.3, 2 * 3 * 8),
                  shape=np.array([-1, 2, 3, 8]))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Reshape", ["r", "shape_i"], ["nhwc"]),
             helper.make_node("Transpose", ["nhwc"], ["t"], perm=[0, 3, 1, 2]), deconv]
    model = _model(nodes, [("x", [None, 5])], "y", {k: v for k, v in consts.items()
                                                     if k != "shape"})
    model.graph.initializer.append(numpy_helper.from_array(consts["shape"], "shape_i"))
    x = RNG.uniform(-1, 1, (3, 5)).astype(np.float32)
    ops = _ops(_same(model, x))
    assert "Transpose" not in ops[:5] and ops[:4] == ["MatMul", "Add", "Relu", "Reshape"]


def test_other_transposed_convolutions_are_left_alone():
    consts = {"w": RNG.normal(0, 0.3, (4, 3, 3, 3))}
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[1, 1],
                            kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = _model([node], [("x", [None, 4, 5, 5])], "y", consts)
    x = RNG.uniform(-1, 1, (2, 4, 5, 5)).astype(np.float32)
    assert _ops(_same(model, x)) == ["ConvTranspose"]


@pytest.mark.parametrize("model", ["conv-ae", "conv-vae"])
def test_conv_exports_keep_no_transposed_convolution(fitted, model):
    pytest.importorskip("tf2onnx")
    from anomaly.export.onnx import to_onnx

    proto, _ = to_onnx(fitted(model))
    ops = _ops(proto)
    assert "ConvTranspose" not in ops and "Conv" in ops
