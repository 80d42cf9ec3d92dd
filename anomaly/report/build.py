"""Writing a report: analysis -> figures -> page -> one atomic folder.

:func:`build_report` reports on test data its caller already has (``anomaly fit`` passes the
split it evaluated on and its scores, so nothing is loaded or scored twice);
:func:`report_for_artifact` is ``anomaly report``: it loads the artifact and its test split.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly.errors import ConfigError, DataError, expected
from anomaly.report import analysis
from anomaly.report.analysis import Missing
from anomaly.report.figures import FIGURES, render
from anomaly.report.html import render_page

REPORTS_DIR = "_reports"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_report_dir(artifact: str | Path) -> Path:
    """``MODELS/_reports/NAME/VERSION`` for the artifact ``MODELS/NAME/VERSION``."""
    path = Path(artifact).resolve()
    return path.parent.parent / REPORTS_DIR / path.parent.name / path.name


def check_report_dir(out_dir: Path) -> Path:
    """Refuse to replace anything but an earlier report (a folder holding ``summary.json`` and
    ``report.html``): the report is written atomically by swapping the whole folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not ((out_dir / "summary.json").is_file()
                                            and (out_dir / "report.html").is_file()))):
        raise expected("an --output folder that is new, empty or an earlier report",
                       f"{out_dir} (holds other files)",
                       hint="Pick another folder: the report replaces its --output folder.",
                       cls=ConfigError)
    return out_dir


@dataclass
class Report:
    """A written report: its folder, page, figures and summary numbers; ``notes`` says why
    each left-out figure is left out."""

    path: Path
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def _load_test_set(artifact, metadata: dict, **kwargs):
    # The only place the report reaches into the pipeline for data.
    from anomaly.data.prepare import load_test_set

    return load_test_set(artifact, metadata, **kwargs)


def _provenance(detector, artifact: Path | None, history):
    """Metadata, hash and training history: from the artifact when given, else what the
    detector carries (a loaded one knows its metadata and hash, a fitted one its history)."""
    meta = getattr(detector, "metadata_", None) or {}
    sha = getattr(detector, "artifact_sha256_", None)
    if artifact is not None:
        from anomaly.artifact import read_info

        info = read_info(artifact)
        meta, sha = info.metadata, info.sha256
    if history is None:
        history = getattr(detector, "history_", None) or None
    if history is None and artifact is not None and (artifact / "history.csv").is_file():
        history = pd.read_csv(artifact / "history.csv")
    return meta, sha, history


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def build_report(detector, test, output: str | Path | None = None, *,
                 scores: np.ndarray | None = None, evaluation=None,
                 artifact: str | Path | None = None, history=None, max_points: int = 2000, tsne_points: int = 300,
                 examples: int = 6, seed: int = 0) -> Report:
    """Write the report of a fitted detector on labelled test images.

    Args:
        detector: a fitted :class:`~anomaly.detector.Detector`.
        test: the test images, with attributes ``x`` ``(N, H, W)`` or ``(N, H, W, C)``
            float32 in [0, 1], ``y`` ``(N,)`` (1 = anomaly), ``classes`` ``(N,)``,
            ``class_names``, ``dataset`` and ``normal_classes``, optionally ``masks``
            ``(N, H, W)`` and ``has_mask`` ``(N,)`` (an :class:`anomaly.data.splits.TestSet`).
        output: the report folder, replaced if it holds an earlier report; default
            :func:`default_report_dir` of ``artifact``.
        scores: the detector's scores ``(N,)`` of ``test.x`` when already computed.
        evaluation: the :class:`~anomaly.evaluation.Evaluation` of those ``scores`` when
            already computed (its pixel metrics spare scoring every error map again).
        artifact: the detector's artifact directory, for the page's provenance (metadata,
            hash) and ``history.csv``; optional.
        history: per-epoch losses (dict of lists or DataFrame); default the detector's
            ``history_`` or the artifact's ``history.csv``.
        max_points, tsne_points, examples, seed: see :func:`analysis.analyze`.
    """
    from anomaly.utils import atomic_dir

    artifact = Path(artifact) if artifact is not None else None
    if output is None:
        if artifact is None:
            raise expected("an output folder (or the artifact to put the report beside)",
                           "neither", cls=DataError)
        output = default_report_dir(artifact)
    out_dir = check_report_dir(Path(output))
    meta, sha, history = _provenance(detector, artifact, history)
    if scores is None:
        evaluation = None  # an evaluation belongs to its scores
    data = analysis.analyze(detector, test, scores, evaluation=evaluation, history=history,
                            max_points=max_points, tsne_points=tsne_points, examples=examples,
                            seed=seed)
    pngs: dict[str, bytes] = {}
    notes: dict[str, str] = {}
    for spec in FIGURES.values():
        got = render(spec, data)
        if isinstance(got, Missing):
            notes[spec.file] = got.reason
        else:
            pngs[spec.file] = got
    summary = {
        "artifact": str(artifact.resolve()) if artifact is not None else None,
        "artifact_sha256": sha,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "name": meta.get("name"),
        "version": meta.get("version"),
        "n_train": meta.get("n_train"),
        "n_val": meta.get("n_val"),
        "epochs_run": meta.get("epochs_run"),
        "hyperparameters": detector.get_params(),
        **analysis.summary(data),
        "figures": sorted(pngs),
    }
    page = render_page(summary, data, FIGURES.values(), pngs, notes)
    with atomic_dir(out_dir) as tmp:
        for fname, png in pngs.items():
            (tmp / fname).write_bytes(png)
        (tmp / "report.html").write_text(page, encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable)
                                          + "\n")
        data.evaluation.per_class.to_csv(tmp / "per_class.csv", index=False)
    return Report(out_dir, out_dir / "report.html", {f: out_dir / f for f in pngs}, summary,
                  notes)


def report_for_artifact(artifact: str | Path, output: str | Path | None = None, *,
                        dataset: str | None = None, test_data: str | None = None,
                        cache_dir: str | None = None, test_limit: int | None = None,
                        max_points: int = 2000, tsne_points: int = 300, examples: int = 6,
                        seed: int = 0) -> Report:
    """``anomaly report``: load the artifact and its test split, then :func:`build_report`.

    The test images are the artifact's own test split (rebuilt from its ``config.yaml``), or
    those of ``dataset``/``test_data`` (see :func:`anomaly.data.prepare.load_test_set`);
    ``test_limit`` caps their number.
    """
    from anomaly.artifact import resolve
    from anomaly.detector import Detector

    artifact = resolve(artifact)  # a model folder means its newest version
    out_dir = check_report_dir(Path(output) if output is not None
                               else default_report_dir(artifact))  # fail before any work
    det = Detector.load(artifact)
    test = _load_test_set(det.path_, det.metadata_, dataset=dataset, test_data=test_data,
                          cache_dir=cache_dir, test_limit=test_limit, seed=det.seed,
                          image_shape=det.image_shape_)
    return build_report(det, test, out_dir, artifact=artifact, max_points=max_points,
                        tsne_points=tsne_points, examples=examples, seed=seed)


def report_after_fit(result) -> Path | None:
    """The report at the end of ``anomaly fit``: never fails the fit, whose artifact is saved.

    Uses the fit's own test split, scores and evaluation (``result.test``, ``result.scores``,
    ``result.evaluation``, with its pixel metrics) when the result carries them; otherwise
    rebuilds the split from the artifact.

    Returns:
        The ``report.html`` path, or ``None`` when there was nothing to report on or it failed
        (a warning on stderr says why and how to retry).
    """
    if result.path is None:  # a non-chief worker of a multi-worker fit writes nothing
        return None
    if result.evaluation is None:
        print("Report: skipped (no labelled test data to evaluate on)")
        return None
    try:
        det = result.detector
        test = getattr(result, "test", None)
        # Scores and their evaluation belong to the fit's own split: never pair them with a
        # reloaded one.
        scores = getattr(result, "scores", None) if test is not None else None
        evaluation = result.evaluation if scores is not None else None
        if test is None:
            from anomaly.artifact import read_info

            test = _load_test_set(result.path, read_info(result.path).metadata, seed=det.seed)
        rep = build_report(det, test, default_report_dir(result.path), scores=scores,
                           evaluation=evaluation, artifact=result.path)
    except Exception as exc:  # the artifact is already saved: warn, do not fail the fit
        _log(f"warning: the report could not be written ({type(exc).__name__}: {exc}); "
             f"run 'anomaly report {result.path}' to try again")
        return None
    print(f"Report: {rep.html}")
    return rep.html
