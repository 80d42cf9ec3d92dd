"""The report page: a Jinja2 template (``templates/report.html.j2``) filled with the numbers.

The page is self-contained: every figure is embedded as a base64 ``data:`` URI and the style
sheet is inline, so it opens offline without any other file. Autoescaping is on: names of
classes, data sets and models from user data cannot inject markup.
"""

from __future__ import annotations

import base64

from anomaly.report.analysis import Missing, ReportData, defect_rows


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def _pct(v, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _ci(v, digits: int = 2) -> str:
    return "-" if v is None else f"[{_pct(v[0], digits)}, {_pct(v[1], digits)}]"


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("anomaly.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=_fmt, pct=_pct, ci=_ci)
    return env


def render_page(summary: dict, data: ReportData, specs, pngs: dict[str, bytes],
                notes: dict[str, str]) -> str:
    """The HTML page.

    Args:
        summary: the numbers of ``summary.json``.
        data: what :func:`anomaly.report.analysis.analyze` returned.
        specs: the :class:`~anomaly.report.figures.FigureSpec` of every figure, in page order.
        pngs: file name -> PNG bytes of the figures drawn; ``notes``: file name -> why a
            figure is left out.
    """
    figures = [{"anchor": s.anchor, "file": s.file, "title": s.title, "caption": s.caption,
                "section": s.section, "note": notes.get(s.file),
                "src": ("data:image/png;base64," + base64.b64encode(pngs[s.file]).decode("ascii")
                        if s.file in pngs else None)} for s in specs]
    sections = list(dict.fromkeys(f["section"] for f in figures))
    per_class = data.evaluation.per_class
    op_cols = [c for c in per_class.columns if c.startswith("flagged@")]
    pixel = data.pixel if isinstance(data.pixel, dict) else None
    return _environment().get_template("report.html.j2").render(
        s=summary, data=data, figures=figures, sections=sections,
        ranking=None if isinstance(data.ranking, Missing) else data.ranking,
        uniformity=None if isinstance(data.uniformity, Missing) else data.uniformity,
        checks=data.fpr_checks, disagree=[c for c in data.fpr_checks if c.agrees is False],
        per_class=per_class.to_dict("records"), op_cols=op_cols, pixel=pixel,
        defects=defect_rows(data) if pixel else [])
