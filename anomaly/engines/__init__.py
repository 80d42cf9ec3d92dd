"""Batch scoring of image collections larger than memory: :func:`score_dataset`.

One plan (:func:`anomaly.data.shards.plan_blocks`), one output folder
(:class:`anomaly.engines.blocks.RunOutput`), and an engine that runs a
:class:`~anomaly.engines.blocks.BlockScorer` over the blocks not yet written:

- ``local``: in this process, block after block.
- ``ray``: Ray Data ``map_batches`` over a pool of actors, each loading the artifact once
  (:mod:`anomaly.engines.ray`), on a local Ray or a cluster (``address``).

Both engines score the same blocks with the same batch size and runtime, so their scores are
equal, bit for bit. A new engine is one module with a ``run(pending, scorer_kwargs, **options)``
that yields each block's counts, plus one line in :data:`ENGINES` (and its name in
:data:`anomaly.config.ENGINE_NAMES`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from anomaly.config import BLOCK_ROWS, ENGINE_NAMES, SCORE_BATCH_SIZE
from anomaly.data.shards import ID_COLUMN, IMAGE_COLUMN, plan_blocks
from anomaly.engines.blocks import OUTPUT_FORMATS, BlockScorer, RunOutput
from anomaly.errors import ConfigError, expected

__all__ = ["ENGINES", "OUTPUT_FORMATS", "BlockScorer", "score_dataset"]


def _run_local(pending, scorer_kwargs: dict, **_) -> Iterator[dict]:
    scorer = BlockScorer(**scorer_kwargs)
    for block in pending:
        yield scorer.score_block(block)


def _run_ray(pending, scorer_kwargs: dict, **options) -> Iterator[dict]:
    from anomaly.engines.ray import run

    yield from run(pending, scorer_kwargs, **options)


#: name -> runner(pending blocks, BlockScorer kwargs, **engine options) -> per-block counts.
ENGINES: dict[str, Callable[..., Iterator[dict]]] = {"local": _run_local, "ray": _run_ray}
assert tuple(ENGINES) == ENGINE_NAMES, "anomaly.config.ENGINE_NAMES lists the engines"


def score_dataset(artifact: str | Path, input: str | Path, output: str | Path, *,
                  engine: str = "local", address: str | None = None,
                  num_actors: int | None = None, batch_size: int = SCORE_BATCH_SIZE,
                  block_rows: int = BLOCK_ROWS, operating_point: str | None = None,
                  runtime: str = "auto", output_format: str = "parquet",
                  image_column: str = IMAGE_COLUMN, id_column: str = ID_COLUMN,
                  skip_bad: bool = False,
                  on_start: Callable[[int, int], None] | None = None,
                  on_block: Callable[[dict], None] | None = None) -> dict:
    """Score every image of ``input`` with ``artifact``; write one part per block to
    ``output``.

    Args:
        artifact: anything :func:`anomaly.artifact.resolve` takes; read by every actor, so on
            a cluster it must be on storage every node sees.
        input: ``.npy`` file or shards, Parquet file(s) or an image folder (see
            :mod:`anomaly.data.shards`).
        output: a new (or this run's earlier) folder; parts ``(rows, 4)``: id, score,
            normalized_score, is_anomaly (+ skipped with ``skip_bad``).
        engine: a key of :data:`ENGINES`.
        address: Ray's cluster address (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``);
            ``None`` starts a local Ray.
        num_actors: Ray actors (default: one per CPU of the cluster).
        runtime: ``auto`` (the artifact's ONNX export when it has one and onnxruntime is
            installed, else Keras), ``onnx`` or ``keras``.
        on_start: called with (images in the input, images still to score) once planned.
        on_block: called with each finished block's counts (progress).

    Returns:
        Totals (rows, scored, anomalous, skipped, parts) and the run's figures (seconds,
        images_per_s, blocks written now, peak memory per actor), also in ``_SUCCESS.json``.
    """
    from anomaly.artifact import read_artifact
    from anomaly.calibration import Calibration

    if engine not in ENGINES:
        raise expected(f"an engine in {tuple(ENGINES)}", repr(engine), cls=ConfigError)
    if engine != "ray" and (address is not None or num_actors is not None):
        raise expected("--address and --num-actors only with --engine ray",
                       f"--engine {engine}", cls=ConfigError)
    for name, value in (("batch_size", batch_size), ("num_actors", num_actors)):
        if value is not None and int(value) < 1:
            raise expected(f"{name} >= 1", value, cls=ConfigError)
    art = read_artifact(artifact)  # verified once here, and again by every actor
    op = Calibration.from_dict(art.json("calibration.json")).get(operating_point).name
    plan = plan_blocks(input, block_rows=block_rows, image_column=image_column,
                       id_column=id_column)
    spec = {"artifact": str(art.path), "artifact_sha256": art.sha256, "input": plan.source,
            "input_fingerprint": plan.fingerprint, "operating_point": op, "runtime": runtime,
            "batch_size": int(batch_size), "skip_bad": bool(skip_bad)}
    out = RunOutput.open(output, spec, output_format)
    done = out.done(plan)
    pending = [b for b in plan.blocks if b.index not in done]
    scorer_kwargs = {"artifact": str(art.path), "output": str(out.path), "sha256": art.sha256,
                     "runtime": runtime, "operating_point": op, "batch_size": int(batch_size),
                     "output_format": output_format, "image_column": image_column,
                     "id_column": id_column, "skip_bad": bool(skip_bad)}
    if on_start is not None:
        on_start(plan.n_rows, sum(b.n_rows for b in pending))
    t0 = time.perf_counter()
    rows, per_process, runtimes, written = 0, {}, set(), {}
    if pending:
        for counts in ENGINES[engine](pending, scorer_kwargs, address=address,
                                      num_actors=num_actors):
            rows += counts["rows"]
            written[counts["index"]] = counts
            per_process[counts["pid"]] = max(per_process.get(counts["pid"], 0.0),
                                             counts["rss_mib"])
            runtimes.add(counts["runtime"])
            if on_block is not None:
                on_block(counts)
    seconds = time.perf_counter() - t0
    return out.finish(plan, {
        "artifact": str(art.path), "input": plan.source, "output": str(out.path),
        "engine": engine, "operating_point": op, "runtime": sorted(runtimes),
        "parts_written": len(pending), "parts_resumed": len(done),
        "rows_written": rows, "seconds": round(seconds, 3),
        "images_per_s": round(rows / seconds, 1) if rows and seconds else None,
        "processes": len(per_process),
        "peak_rss_mib_per_process": round(max(per_process.values()), 1) if per_process
        else None}, written)
