"""Rewrites of the converted ONNX graph that onnxruntime's CPU kernels run faster (issue #12).

Each rewrite computes the same values from the same weights, with standard ONNX ops at the
export's opset; only the order of float32 additions changes (the export's verification against
TensorFlow checks the result, as for any graph). What onnxruntime 1.32 does with tf2onnx's graph
of the conv decoder, and what replaces it (profiled on the MNIST conv-vae, per image on one
core; bench/results/runtime-bench.md):

- ``ConvTranspose`` is a GEMM per image plus a single-threaded col2im, and never enters the
  blocked NCHWc layout in which onnxruntime's ``Conv`` runs at the core's peak: 60% of the time
  in the two transposed convolutions. A stride-2 3x3 transposed convolution with Keras' ``same``
  padding is four stride-1 convolutions on the input grid, one per output pixel parity (kernels
  2x2, 2x1, 1x2 and 1x1: the nine taps, none wasted), :func:`_deconv`.
- The four parity maps are interleaved in NHWC, where a column pair is one contiguous run:
  onnxruntime's ``DepthToSpace`` (the usual sub-pixel interleave) costs more than the convolution
  it follows, which is why an earlier sub-pixel rewrite was slower.
- When the parity maps feed a 3x3 convolution with few output channels (the decoder's logits,
  1 or 3 channels), they are not interleaved at all: NCHWc pads those outputs to 16 channels,
  16 times the work. The convolution is computed on the parity maps instead (:func:`_logits`):
  a 1x1 convolution to one channel per tap, a depthwise one-hot 3x3 convolution that shifts each
  tap into place, a 1x1 convolution that sums the taps of each output parity, then a
  ``DepthToSpace`` of the few output channels.
- A dense layer reshaped to NHWC and transposed to NCHW (the decoder's input) gets its columns
  permuted instead (:func:`_dense_layouts`): no transpose at run time, and no sum changes order.
  The encoder's flatten (NCHW to NHWC into a dense layer) is left alone: permuting that layer's
  rows reorders its 3,136-term sums, and the kNN distance of a code near its neighbours
  magnifies the difference (3e-6 of a part against 2e-7, where the tolerance is 1e-5).
"""

from __future__ import annotations

import numpy as np

#: Taps of a stride-2 3x3 transposed convolution (pads 0 before, 1 after) that reach output
#: pixels of each parity, as the kernel rows of a stride-1 convolution over the input whose first
#: row lies one pixel up: even outputs take tap 2 from the pixel above and tap 0 from their own,
#: odd outputs tap 1 from their own.
_PARITY_TAPS = {0: [2, 0], 1: [1]}
#: onnxruntime's NCHWc block: output channels are padded to a multiple of it.
_BLOCK = 16


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plain(attrs: dict, pads: list[int], strides: list[int]) -> bool:
    """A 2-D convolution attribute set with these pads and strides, dilation 1, one group."""
    auto = attrs.get("auto_pad", b"NOTSET")
    return (list(attrs.get("pads", [0, 0, 0, 0])) == pads
            and list(attrs.get("strides", [1, 1])) == strides
            and list(attrs.get("dilations", [1, 1])) == [1, 1] and attrs.get("group", 1) == 1
            and (auto.decode() if isinstance(auto, bytes) else auto) == "NOTSET")


class _Graph:
    """The model's nodes, constant initializers and static shapes, and a builder of new nodes."""

    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        self.model = onnx.shape_inference.infer_shapes(model)
        g = self.model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                                for d in v.type.tensor_type.shape.dim]
                       for v in (*g.value_info, *g.input, *g.output)}
        self.outputs = {o.name for o in g.output}
        self.users: dict[str, list] = {}
        for n in g.node:
            for name in n.input:
                self.users.setdefault(name, []).append(n)
        self.nodes = list(g.node)
        self.new_consts: list = []
        self._count = 0

    def sole_user(self, name: str, op_type: str):
        """The one node reading ``name`` if it is an ``op_type`` and ``name`` is no graph output."""
        users = self.users.get(name, [])
        if len(users) == 1 and name not in self.outputs and users[0].op_type == op_type:
            return users[0]
        return None

    def const(self, value, hint: str) -> str:
        from onnx import numpy_helper

        self._count += 1
        name = f"fast/{hint}_{self._count}"
        self.new_consts.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, out: list, op: str, inputs: list[str], hint: str, output: str | None = None,
             **attrs) -> str:
        """Append a node to ``out``; returns its output's name (``output`` or a new one)."""
        from onnx import helper

        self._count += 1
        name = output or f"fast/{hint}_{self._count}"
        out.append(helper.make_node(op, inputs, [name], name=f"fast/{hint}_{self._count}",
                                    **attrs))
        return name

    def finish(self, replaced: dict, dropped: set):
        """The model with ``replaced[id(node)]`` (node lists) in place of those nodes, without
        ``dropped`` ones and without initializers nothing reads any more."""
        import onnx

        g = self.model.graph
        body = []
        for n in self.nodes:
            if id(n) in replaced:
                body.extend(replaced[id(n)])
            elif id(n) not in dropped:
                body.append(n)
        del g.node[:]
        g.node.extend(body)
        g.initializer.extend(self.new_consts)
        read = {name for n in g.node for name in n.input} | self.outputs
        keep = [t for t in g.initializer if t.name in read]
        del g.initializer[:]
        g.initializer.extend(keep)
        del g.value_info[:]  # stale for the replaced nodes; onnxruntime infers its own
        onnx.checker.check_model(self.model)
        return self.model


def _deconv_weights(graph: _Graph, node):
    """``(W, b)`` of a ConvTranspose that :func:`_deconv` rewrites, else ``None``."""
    if node.op_type != "ConvTranspose" or len(node.input) not in (2, 3):
        return None
    attrs = _attrs(node)
    w = graph.consts.get(node.input[1])
    b = graph.consts.get(node.input[2]) if len(node.input) == 3 else None
    if (w is None or w.ndim != 4 or w.shape[2:] != (3, 3) or w.dtype != np.float32
            or (len(node.input) == 3 and b is None) or "output_shape" in attrs
            or any(attrs.get("output_padding", [])) or not _plain(attrs, [0, 0, 1, 1], [2, 2])
            or len(graph.shapes.get(node.input[0], [])) != 4
            or None in graph.shapes[node.input[0]][1:]):
        return None
    return w, (np.zeros(w.shape[1], np.float32) if b is None else b)


def _small_conv(graph: _Graph, node):
    """``(W, b)`` of a 3x3 same-size convolution with fewer than ``_BLOCK`` outputs, or ``None``."""
    if node is None or len(node.input) not in (2, 3):
        return None
    w = graph.consts.get(node.input[1])
    b = graph.consts.get(node.input[2]) if len(node.input) == 3 else None
    if (w is None or w.ndim != 4 or w.shape[2:] != (3, 3) or w.shape[0] >= _BLOCK
            or (len(node.input) == 3 and b is None)
            or not _plain(_attrs(node), [1, 1, 1, 1], [1, 1])):
        return None
    return w, (np.zeros(w.shape[0], np.float32) if b is None else b)


def _parity_conv(graph, out, x, w, b, a: int, c: int, relu: bool) -> str:
    """The stride-1 convolution of input ``x`` that gives the transposed convolution's output
    pixels of row parity ``a`` and column parity ``c``."""
    rows, cols = _PARITY_TAPS[a], _PARITY_TAPS[c]
    kernel = np.ascontiguousarray(w[:, :, rows][:, :, :, cols].transpose(1, 0, 2, 3))
    y = graph.node(out, "Conv", [x, graph.const(kernel, "w"), graph.const(b, "b")], f"p{a}{c}",
                   kernel_shape=[len(rows), len(cols)], pads=[len(rows) - 1, len(cols) - 1, 0, 0])
    return graph.node(out, "Relu", [y], f"p{a}{c}_relu") if relu else y


def _deconv(graph: _Graph, node, w, b, relu, output: str) -> list:
    """Nodes that compute ``output`` (NCHW, the ConvTranspose's or its ReLU's) from the four
    parity convolutions, interleaved in NHWC."""
    out: list = []
    c = w.shape[1]
    hi, wi = graph.shapes[node.input[0]][2:]
    rows = []
    for a in (0, 1):
        pair = [_parity_conv(graph, out, node.input[0], w, b, a, col, relu) for col in (0, 1)]
        # Channels (column parity, channel): in NHWC each pixel pair is one contiguous run.
        y = graph.node(out, "Concat", pair, f"row{a}", axis=1)
        y = graph.node(out, "Transpose", [y], f"row{a}_nhwc", perm=[0, 2, 3, 1])
        rows.append(graph.node(out, "Reshape", [y, graph.const(np.array([0, hi, 1, -1]), "s")],
                               f"row{a}_flat"))
    y = graph.node(out, "Concat", rows, "rows", axis=2)
    y = graph.node(out, "Reshape", [y, graph.const(np.array([0, 2 * hi, 2 * wi, c]), "s")],
                   "nhwc")
    graph.node(out, "Transpose", [y], "nchw", output=output, perm=[0, 3, 1, 2])
    return out


def _logits(graph: _Graph, node, w, b, relu, wl, bl, output: str) -> list:
    """Nodes that compute ``output``, the small 3x3 convolution (``wl``, ``bl``) of the
    transposed convolution's output, from the four parity maps without interleaving them."""
    out: list = []
    cl, c = wl.shape[:2]
    taps = 9 * cl
    width = -(-taps // _BLOCK) * _BLOCK
    # Per parity map, one channel per (tap, output channel): the 1x1 part of the 3x3 conv.
    pointwise = np.zeros((width, c, 1, 1), np.float32)
    for dy in range(3):
        for dx in range(3):
            t = 3 * dy + dx
            pointwise[t * cl : (t + 1) * cl, :, 0, 0] = wl[:, :, dy, dx]
    per_tap = []
    for a in (0, 1):
        for col in (0, 1):
            r = _parity_conv(graph, out, node.input[0], w, b, a, col, relu)
            per_tap.append(graph.node(out, "Conv", [r, graph.const(pointwise, "w")], f"t{a}{col}",
                                      kernel_shape=[1, 1]))
    stacked = graph.node(out, "Concat", per_tap, "taps", axis=1)
    # Output pixel (2m + a', 2q + b') takes tap (dy, dx) from parity map (a, b) at (m + sy, q + sx)
    # with a = (a' + dy - 1) mod 2, sy = (a' + dy - 1) // 2: each (map, tap) channel serves one
    # output parity, so one depthwise one-hot kernel shifts it into place and a 1x1 convolution
    # sums the nine taps of each output parity.
    shift = np.zeros((4 * width, 1, 3, 3), np.float32)
    total = np.zeros((4 * cl, 4 * width, 1, 1), np.float32)
    for a in (0, 1):
        for col in (0, 1):
            for dy in range(3):
                for dx in range(3):
                    oy, ox = (a - dy + 1) % 2, (col - dx + 1) % 2
                    sy, sx = (oy + dy - 1) // 2, (ox + dx - 1) // 2
                    for k in range(cl):
                        ch = (2 * a + col) * width + (3 * dy + dx) * cl + k
                        shift[ch, 0, 1 + sy, 1 + sx] = 1.0
                        total[(2 * oy + ox) * cl + k, ch, 0, 0] = 1.0
    y = graph.node(out, "Conv", [stacked, graph.const(shift, "w")], "shift",
                   kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=4 * width)
    y = graph.node(out, "Conv", [y, graph.const(total, "w"), graph.const(np.tile(bl, 4), "b")],
                   "sum", kernel_shape=[1, 1])
    # Channels (output parity, channel) -> pixels: DCR order.
    graph.node(out, "DepthToSpace", [y], "interleave", output=output, blocksize=2, mode="DCR")
    return out


def _dense_layouts(graph: _Graph, replaced: dict, dropped: set) -> None:
    """Permute dense layers instead of transposing their outputs to NCHW (module docstring)."""
    for t in graph.nodes:
        if t.op_type != "Transpose" or id(t) in dropped:
            continue
        if list(_attrs(t).get("perm", [])) == [0, 3, 1, 2]:
            _dense_to_nchw(graph, t, replaced, dropped)


def _feature_order(h: int, w: int, c: int) -> np.ndarray:
    """Indices of the NHWC-flattened features in NCHW order."""
    return np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).ravel()


def _dense_to_nchw(graph: _Graph, transpose, replaced: dict, dropped: set) -> None:
    """MatMul [-> Add bias] [-> Relu] -> Reshape [N, H, W, C] -> Transpose to NCHW: the MatMul's
    columns (and the bias) in NCHW order and a Reshape to [N, C, H, W]."""
    reshape = next((n for n in graph.nodes if transpose.input[0] in n.output), None)
    if reshape is None or reshape.op_type != "Reshape" or graph.sole_user(
            reshape.output[0], "Transpose") is None:
        return
    shape = graph.consts.get(reshape.input[1])
    if shape is None or shape.shape != (4,) or (shape[1:] <= 0).any():
        return
    h, w, c = (int(v) for v in shape[1:])
    order = _feature_order(h, w, c)
    permuted, name = {}, reshape.input[0]
    while True:  # up through per-feature ops to the MatMul
        producer = next((n for n in graph.nodes if name in n.output), None)
        if producer is None or len(graph.users.get(name, [])) != 1 or name in graph.outputs:
            return
        if producer.op_type in ("MatMul", "Add"):
            value = graph.consts.get(producer.input[1])
            if value is None or value.ndim != (2 if producer.op_type == "MatMul" else 1) or (
                    value.shape[-1] != order.size):
                return
            permuted[id(producer)] = (producer, np.ascontiguousarray(value[..., order]))
        elif producer.op_type != "Relu":
            return
        if producer.op_type == "MatMul":
            break
        name = producer.input[0]
    for n, value in permuted.values():
        replaced[id(n)] = [_with_input(n, 1, graph.const(value, "dense"))]
    nchw = graph.const(np.array([shape[0], c, h, w], shape.dtype), "s")
    replaced[id(reshape)] = [_with_input(reshape, 1, nchw, output=transpose.output[0])]
    dropped.add(id(transpose))


def _with_input(node, index: int, name: str, output: str | None = None):
    import copy

    new = copy.deepcopy(node)
    new.input[index] = name
    if output is not None:
        new.output[0] = output
    return new


def rewrite(model):
    """``model`` (an ``onnx.ModelProto`` from tf2onnx) with the rewrites of the module docstring
    applied wherever their pattern matches; a graph without one comes back unchanged."""
    graph = _Graph(model)
    replaced: dict = {}
    dropped: set = set()
    for node in graph.nodes:
        weights = _deconv_weights(graph, node)
        if weights is None:
            continue
        relu = graph.sole_user(node.output[0], "Relu")
        output = (relu or node).output[0]
        small = graph.sole_user(output, "Conv")
        logits = _small_conv(graph, small)
        if logits is not None:
            replaced[id(node)] = _logits(graph, node, *weights, relu is not None, *logits,
                                         small.output[0])
            dropped.add(id(small))
        else:
            replaced[id(node)] = _deconv(graph, node, *weights, relu is not None, output)
        if relu is not None:
            dropped.add(id(relu))
    _dense_layouts(graph, replaced, dropped)
    return graph.finish(replaced, dropped)
