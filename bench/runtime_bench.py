"""In-process speed of the two runtimes: onnxruntime (an ONNX export) vs TensorFlow (Keras).

    flock /tmp/anomaly-train.lock python bench/runtime_bench.py [--runs 5] [--artifact PATH]

Without ``--artifact`` it trains the recommended detector (configs/mnist.yaml: conv-vae,
``mse+knn+tp``, ``top10``) for one epoch on all MNIST zeros (the weights do not change the
speed; the kNN memory gets its real size, ~5,300 codes), exports it with ``anomaly export``'s
code, and scores the 10,000 MNIST test images with both runtimes through the same call the
service makes (``detect``): scores and decisions only, then with reconstructions and error
maps; then single images (latency) and the service's 64-image batches. Prints medians over
``--runs`` as a markdown table, plus the largest score difference between the runtimes, and
the graph's multiply-adds per image (its Conv, ConvTranspose, MatMul and Gemm nodes) with the
arithmetic rate each runtime reached, against the machine's measured ceiling (onnxruntime's
float32 matrix product on all cores): how far from it a speed is, and the most images/s the graph
could score at that rate. For an
``mse+knn+tp`` model a third row times TensorFlow with the classifier's batch norms left
unfolded (what :func:`anomaly.models.networks.fold_batch_norm` is worth).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _artifact(tmp: Path) -> Path:
    from anomaly.config import resolve
    from anomaly.data.builtin import load_dataset
    from anomaly.detector import Detector

    cfg = resolve(str(ROOT / "configs" / "mnist.yaml"), {"epochs": 1})
    ds = load_dataset("mnist")
    det = Detector.from_config(cfg.detector).fit(ds.x_train[ds.y_train == 0])
    return det.save(tmp / "models" / "mnist-0" / "1")


def graph_macs(model_path: Path) -> float:
    """Multiply-adds per image of an ONNX graph whose first input's first dimension is the
    batch: the Conv, ConvTranspose, MatMul and Gemm nodes, from shapes inferred at batch 1.
    A batch of one counts what one image costs (the kNN memory's product included).

    Shape inference loses the batch behind the graph's dynamic reshapes; the batch is the only
    unknown dimension, so an unknown dimension counts as 1, and a product's inner size is read
    off its weight where the input's is unknown."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(model_path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {}
    for v in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in model.graph.node:
        ins = [shapes.get(n) for n in node.input]
        out = shapes.get(node.output[0])
        if len(ins) < 2 or not ins[0] or not ins[1] or not out:
            continue
        out_size = int(np.prod([d or 1 for d in out]))
        if node.op_type == "Conv":  # weight (out, in/group, kh, kw)
            total += out_size * int(np.prod(ins[1][1:]))
        elif node.op_type == "ConvTranspose":  # every input pixel scatters its kernel
            total += int(np.prod([d or 1 for d in ins[0]])) * int(np.prod(ins[1][1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            inner = ins[0][-2] if trans_a else ins[0][-1]
            if not inner and len(ins[1]) >= 2:
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                inner = ins[1][-1] if trans_b else ins[1][-2]
            total += out_size * (inner or 1)
    return float(total)


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    """The machine's practical float32 ceiling: onnxruntime's ``(n, n)`` MatMul on all cores.

    A virtual machine shows its base clock, not the boost its cores run at, so a peak computed
    from the clock and the vector width is a guess; a tuned matrix product is the measured upper
    bound that convolution kernels approach. onnxruntime's own (MLAS) kernels, not numpy's
    BLAS: the OpenBLAS numpy ships picks its AVX2 kernels on some AVX-512 CPUs (AMD Zen 5:
    240 against MLAS's 324 GFLOP/s, 2026-12-03). Median of ``runs`` products.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    spec = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [n, n]) for v in "abc"]
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])],
                                                "matmul", spec[:2], spec[2:]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {v: rng.standard_normal((n, n), dtype=np.float32) for v in "ab"}
    sess.run(None, feed)  # warm up the thread pool
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def _median_rate(fn, x: np.ndarray, runs: int) -> float:
    fn(x[:1024])  # trace and warm up
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        rates.append(len(x) / (time.perf_counter() - t))
    return statistics.median(rates)


def _latency_ms(fn, x: np.ndarray, calls: int = 300) -> tuple[float, float]:
    fn(x[:1])
    times = []
    for i in range(calls):
        t = time.perf_counter()
        fn(x[i : i + 1])
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), float(np.percentile(times, 99))


def _batches(fn, x: np.ndarray, runs: int, size: int = 64) -> float:
    def run(images):
        for i in range(0, len(images), size):
            fn(images[i : i + size])

    return _median_rate(run, x, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--artifact", help="an artifact to export and time (default: train one)")
    args = ap.parse_args()

    from anomaly.data.builtin import load_dataset
    from anomaly.export.onnx import export_onnx
    from anomaly.runtime import load_runtime

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.artifact) if args.artifact else _artifact(Path(tmp))
        t = time.perf_counter()
        exported = export_onnx(src, Path(tmp) / "exported" / "1")
        export_s = time.perf_counter() - t
        keras = load_runtime(exported.path, runtime="keras")
        onnx = load_runtime(exported.path, runtime="onnx")
        x = load_dataset("mnist").x_test.astype(np.float32) / 255.0
        rows, scores = [], {}
        runtimes = [("TensorFlow (Keras)", keras), ("onnxruntime", onnx)]
        if keras.score == "mse+knn+tp":
            # The scorer's classifier as trained, its batch norms not folded into the
            # convolutions (networks.fold_batch_norm): what the fold is worth, side by side.
            unfolded = load_runtime(exported.path, runtime="keras")
            unfolded.scorer._tp_net = None  # read when the graph is first traced, below
            runtimes.insert(1, ("TensorFlow, batch norms not folded", unfolded))
        for name, det in runtimes:
            def plain(images, det=det):
                return det.detect(images, validated=True)

            def full(images, det=det):
                return det.detect(images, reconstruction=True, error_map=True, validated=True)

            scores[name] = det.detect(x, validated=True).scores
            p50, p99 = _latency_ms(plain, x)
            rows.append((name, _median_rate(plain, x, args.runs), _median_rate(full, x, args.runs),
                         _batches(plain, x, args.runs), p50, p99))
            print(f"{name}: done", flush=True)
        ref = scores["TensorFlow (Keras)"]
        gap = np.abs(scores["onnxruntime"] - ref)
        from anomaly.runtime import CHUNK

        print(f"\nonnxruntime: {onnx.threads_} threads, each running {CHUNK}-image calls of one "
              f"thread; TensorFlow: its own pools, {keras.scorer.batch_size}-image calls")
        print(f"model: {keras.model}, score {keras.score} ({keras.aggregation}), kNN memory "
              f"{len(keras.knn_.memory) if keras.knn_ is not None else 0} codes; export "
              f"{export_s:.1f} s; max |score difference| {gap.max():.3g} "
              f"({(gap / np.abs(ref)).max():.3g} relative, scores span {ref.min():.3g}.."
              f"{ref.max():.3g})\n")
        macs = graph_macs(exported.path / "model.onnx")
        peak = matmul_gflops()
        print(f"graph: {macs / 1e6:.2f} M multiply-adds an image; scores only: "
              + ", ".join(f"{name} {rate * macs * 2 / 1e9:.0f} GFLOP/s"
                          f" ({rate * macs * 2 / 1e9 / peak:.0%} of the matrix product)"
                          for name, rate, *_ in rows))
        print(f"ceiling: onnxruntime's float32 2048x2048 MatMul on all cores {peak:.0f} "
              f"GFLOP/s, so this graph scores at most {peak * 1e9 / (2 * macs):,.0f} images/s "
              "at that rate\n")
        print("| runtime | 10,000 images, scores (images/s) | with reconstructions and error "
              "maps | 64-image batches | one image p50 / p99 (ms) |\n|---|---|---|---|---|")
        for name, rate, rate_full, rate64, p50, p99 in rows:
            print(f"| {name} | {rate:,.0f} | {rate_full:,.0f} | {rate64:,.0f} | "
                  f"{p50:.2f} / {p99:.2f} |")


if __name__ == "__main__":
    main()
