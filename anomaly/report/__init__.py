"""Evaluation reports: what the model sees, as PNG figures and one self-contained HTML page.

``anomaly report ARTIFACT`` (and ``anomaly fit``, unless ``--no-report``) writes a folder::

    report.html           every figure embedded as a base64 data: URI; opens offline, no
                          external file, script, stylesheet or font
    summary.json          the numbers of the summary (AUROC and its interval, partial AUROC,
                          expected vs measured FPRs with intervals, KS, ARI, ...)
    per_class.csv         the per-class detection table
    *.png                 the figures, as in the page (see FIGURES)

**Where it goes.** By default ``MODELS/_reports/NAME/VERSION/`` for the artifact
``MODELS/NAME/VERSION`` (``--output DIR`` to choose). Not inside the artifact, whose manifest
forbids unlisted files, and not beside it in ``MODELS/NAME/``, where the service and
``anomaly models`` would take a folder for a model version: the service skips top-level folders
of the models directory whose names start with ``_``, and the report has no manifest.

**Test images.** ``anomaly fit`` hands over the test split it evaluated on, its scores and
its evaluation; ``anomaly report`` rebuilds the artifact's own split from its ``config.yaml``
(or takes ``--dataset``/``--test-data``). Ground-truth masks (MVTec AD layout) travel with the
split in both cases and add the pixel metrics and the error-map-over-mask figure. Every test image is scored for the curves and tables; the
pictures use at most ``max_points`` of them (latent scatter, k-means) and ``tsne_points`` for
t-SNE, so a report takes seconds.

The parts: :mod:`~anomaly.report.analysis` computes the numbers and image arrays (no
plotting), :mod:`~anomaly.report.figures` declares and draws each figure once,
:mod:`~anomaly.report.html` fills the page's Jinja2 template, :mod:`~anomaly.report.build`
writes the folder atomically. Scores: higher = more anomalous; an image is flagged when
``score > threshold``.
"""

from anomaly.report.build import (
    REPORTS_DIR,
    Report,
    build_report,
    check_report_dir,
    default_report_dir,
    report_after_fit,
    report_for_artifact,
)
from anomaly.report.figures import FIGURES, FigureSpec

__all__ = ["FIGURES", "REPORTS_DIR", "FigureSpec", "Report", "build_report", "check_report_dir",
           "default_report_dir", "report_after_fit", "report_for_artifact"]
