"""What every engine runs: a :class:`BlockScorer` that loads an artifact once and scores
blocks, and the output folder of a run (:class:`RunOutput`), which makes a run restartable.

The output folder holds ``_run.json`` (what the run scores: artifact, input, operating point,
written first), one ``part-NNNNNN.parquet`` (or ``.csv``) per input block, each written
through a temporary file and a rename, and ``_SUCCESS.json`` (totals) at the end. A run started
again on the same folder with the same artifact and input skips the blocks whose part exists:
a block is written whole or not at all, so no row is lost or duplicated however a run dies.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.config import SCORE_BATCH_SIZE
from anomaly.data.shards import ID_COLUMN, IMAGE_COLUMN, Block, Plan, read_block
from anomaly.errors import ConfigError, expected
from anomaly.utils import atomic_write_bytes, atomic_write_text

OUTPUT_FORMATS = ("parquet", "csv")
RUN_FILE, SUCCESS_FILE = "_run.json", "_SUCCESS.json"
#: Format of ``_run.json`` and of the parts' columns.
RUN_FORMAT = 1


def part_name(index: int, output_format: str) -> str:
    return f"part-{index:06d}.{output_format}"


def _rss_mib() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BlockScorer:
    """Scores blocks with one artifact loaded once (one per process: a Ray actor, or the
    local engine's own).

    Args:
        artifact: the artifact's folder (resolved by the caller).
        output: the run's output folder, where each block's part is written.
        sha256: the artifact's manifest hash the run was planned with; a different artifact
            at that path (replaced meanwhile) is refused.
        runtime: ``auto`` (the ONNX export when the artifact has one, else Keras), ``onnx`` or
            ``keras``.
        threads: CPU threads for the runtime (``None``: all).
    """

    def __init__(self, artifact: str, output: str, *, sha256: str | None = None,
                 runtime: str = "auto", operating_point: str | None = None,
                 batch_size: int = SCORE_BATCH_SIZE, output_format: str = "parquet",
                 image_column: str = IMAGE_COLUMN, id_column: str = ID_COLUMN,
                 skip_bad: bool = False, threads: int | None = None):
        from anomaly.runtime import load_runtime

        self.detector = load_runtime(artifact, runtime=runtime, threads=threads)
        if sha256 is not None and self.detector.artifact_sha256_ != sha256:
            raise expected(f"the artifact the run was started with (manifest {sha256[:12]})",
                           f"manifest {self.detector.artifact_sha256_[:12]} at {artifact}",
                           hint="Start the run again into a new output folder.",
                           cls=ConfigError)
        self.output, self.format = Path(output), output_format
        self.operating_point, self.batch_size = operating_point, int(batch_size)
        self.image_column, self.id_column, self.skip_bad = image_column, id_column, skip_bad

    def score(self, images: np.ndarray):
        """``(scores, normalized, is_anomaly)``, each ``(N,)``, of validated images
        ``(N, H, W[, C])``, ``batch_size`` at a time."""
        out = [self.detector.detect(images[s : s + self.batch_size],
                                    operating_point=self.operating_point, validated=True)
               for s in range(0, len(images), self.batch_size)]
        return (np.concatenate([o.scores for o in out]),
                np.concatenate([o.normalized for o in out]),
                np.concatenate([o.is_anomaly for o in out]))

    def score_block(self, block: Block) -> dict:
        """Read, score and write one block; returns its counts and timings."""
        t0 = time.perf_counter()
        ids, images, skipped = read_block(block, self.detector.image_shape_,
                                          image_column=self.image_column,
                                          id_column=self.id_column, skip_bad=self.skip_bad)
        t1 = time.perf_counter()
        if len(images):
            scores, normalized, flagged = self.score(images)
        else:
            scores = normalized = np.zeros(0)
            flagged = np.zeros(0, bool)
        t2 = time.perf_counter()
        write_part(self.output / part_name(block.index, self.format), ids, scores, normalized,
                   flagged, skipped, self.format)
        return {"index": block.index, "rows": len(ids), "anomalous": int(flagged.sum()),
                "skipped": len(skipped), "read_s": t1 - t0, "score_s": t2 - t1,
                "write_s": time.perf_counter() - t2, "pid": os.getpid(),
                "rss_mib": _rss_mib(), "runtime": self.detector.runtime_}


def write_part(path: Path, ids, scores, normalized, flagged, skipped, output_format: str) -> None:
    """One block's rows (id, score, normalized_score, is_anomaly [, skipped]), atomically."""
    import pandas as pd

    df = pd.DataFrame({"id": pd.array(list(ids), dtype="string"),
                       "score": np.asarray(scores, np.float64),
                       "normalized_score": np.asarray(normalized, np.float64),
                       "is_anomaly": pd.array(np.asarray(flagged, bool), dtype="boolean")})
    if skipped:
        bad = pd.DataFrame({"id": pd.array([i for i, _ in skipped], dtype="string"),
                            "skipped": [why for _, why in skipped]})
        df = pd.concat([df.assign(skipped=None), bad], ignore_index=True)
    if output_format == "csv":
        atomic_write_text(path, df.to_csv(index=False))
    else:
        atomic_write_bytes(path, df.to_parquet(index=False))


@dataclass
class RunOutput:
    """A run's output folder: created or resumed by :meth:`open`."""

    path: Path
    output_format: str
    spec: dict

    @classmethod
    def open(cls, path: str | Path, spec: dict, output_format: str) -> RunOutput:
        """Create ``path`` for the run described by ``spec``, or resume it when it holds the
        same run; anything else there is refused (nothing is overwritten)."""
        if output_format not in OUTPUT_FORMATS:
            raise expected(f"an output format in {OUTPUT_FORMATS}", repr(output_format),
                           cls=ConfigError)
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise expected("an output folder (the parts of a run are written into it)",
                           f"{path} (an existing file)", cls=ConfigError)
        spec = {"format": RUN_FORMAT, "output_format": output_format, **spec}
        run_file = path / RUN_FILE
        if run_file.is_file():
            try:
                before = json.loads(run_file.read_text())
            except (OSError, ValueError):
                before = None
            if before != json.loads(json.dumps(spec)):
                diff = sorted(k for k in spec if not isinstance(before, dict)
                              or before.get(k) != spec[k])
                raise expected("an output folder that is empty or holds this same run",
                               f"{path} with a run of a different {', '.join(diff)}",
                               hint="Pass a new --output folder.", cls=ConfigError)
        elif path.is_dir() and any(path.iterdir()):
            raise expected("an output folder that is empty or holds this same run",
                           f"{path} (not empty, and no {RUN_FILE})",
                           hint="Pass a new --output folder.", cls=ConfigError)
        else:
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_file, json.dumps(spec, indent=2))
        return cls(path, output_format, spec)

    def done(self, plan: Plan) -> set[int]:
        """Indexes of the blocks whose part is already written."""
        return {b.index for b in plan.blocks
                if (self.path / part_name(b.index, self.output_format)).is_file()}

    def finish(self, plan: Plan, summary: dict, written: dict[int, dict]) -> dict:
        """Totals over every part, written to ``_SUCCESS.json``: ``written`` (index -> the
        counts :meth:`BlockScorer.score_block` returned) for the parts of this run, the
        earlier parts of a resumed run read back."""
        import pandas as pd

        rows = anomalous = skipped = 0
        for b in plan.blocks:
            if b.index in written:
                c = written[b.index]
                rows, anomalous, skipped = (rows + c["rows"] + c["skipped"],
                                            anomalous + c["anomalous"],
                                            skipped + c["skipped"])
                continue
            part = self.path / part_name(b.index, self.output_format)
            df = (pd.read_csv(part) if self.output_format == "csv" else
                  pd.read_parquet(part))
            rows += len(df)
            anomalous += int(df["is_anomaly"].fillna(False).astype(bool).sum())
            if "skipped" in df:
                skipped += int(df["skipped"].notna().sum())
        totals = {**summary, "rows": rows, "scored": rows - skipped, "anomalous": anomalous,
                  "skipped": skipped, "parts": len(plan.blocks)}
        atomic_write_text(self.path / SUCCESS_FILE, json.dumps(totals, indent=2))
        return totals
