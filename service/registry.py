"""The model registry: scan the models directory, verify, load, warm up, then swap atomically.

Layout: ``MODELS_DIR/NAME/VERSION/`` artifacts written by ``anomaly fit`` (versions sort by
name, the last is the newest). Per model, the newest ``versions_per_model`` loadable versions
are kept loaded; the default one (served when a request names no version) is the pinned version
when ``ANOMALY_PINNED_VERSIONS`` names one, else the newest loaded.

A reload builds a complete new :class:`Snapshot` off to the side and then replaces the old one
in a single assignment. Requests pick the snapshot up once, when they start, and keep the
:class:`LoadedModel` they got until they finish, so a reload never fails or drops an in-flight
request. Each version is verified against its manifest (SHA-256), loaded in Keras safe mode and
warmed up (both compiled graphs run, scores checked finite) before it can serve. A version that
fails any step is *refused*: it is reported in ``/v1/models`` and in
``anomaly_model_refused_versions`` / ``anomaly_model_load_failures_total``, and whatever served
before keeps serving -- including the in-memory copy of a version whose files changed on disk
after it was loaded. Versions whose artifact hash is unchanged are reused without reloading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomaly.artifact import version_key
from anomaly.errors import AnomalyError
from service import metrics
from service.batching import MicroBatcher
from service.errors import ServiceError, expect
from service.inputs import image_shape, pixel_shape
from service.settings import Settings

log = logging.getLogger("anomaly.service")

_WARMUP_SIZES = (1, 2, 8, 64)


class _Refusal(Exception):
    """A verified artifact that failed to load or warm up (``known``: failed before too)."""

    def __init__(self, message: str, sha256: str, *, known: bool = False):
        super().__init__(message)
        self.message, self.sha256, self.known = message, sha256, known


@dataclass(eq=False)
class LoadedModel:
    """One verified, loaded and warmed-up artifact version, ready to score."""

    name: str
    version: str
    path: Path
    detector: object  # anomaly.detector.Detector (imported lazily: TensorFlow is slow to load)
    sha256: str
    loaded_at: float
    load_seconds: float
    batcher: MicroBatcher = field(repr=False)

    @property
    def calibration(self):
        return self.detector.calibration_

    @property
    def metadata(self) -> dict:
        return self.detector.metadata_

    def operating_point(self, name: str | None):
        """The named operating point (the default when ``None``); 422 when unknown."""
        cal = self.calibration
        if name is not None and name not in cal.operating_points:
            raise expect(f"an operating point of {self.name}/{self.version} in "
                         f"{sorted(cal.operating_points)}", repr(name),
                         code="unknown_operating_point")
        return cal.get(name)

    def describe(self, *, default: bool) -> dict:
        """The JSON description used by ``/v1/models``."""
        det, meta, cal = self.detector, self.metadata, self.calibration
        return {
            "version": self.version,
            "default": default,
            "dataset": meta.get("dataset"),
            "normal_classes": meta.get("normal_classes"),
            "class_names": meta.get("class_names"),
            "model_type": meta.get("model_type", det.model),
            "score": det.resolved_score,
            "aggregation": det.aggregation,
            "created_at": meta.get("created_at"),
            "artifact_sha256": self.sha256,
            "default_operating_point": cal.default,
            "operating_points": [
                {"name": p.name, "threshold": p.threshold, "method": p.method,
                 "expected_fpr": p.expected_fpr, "expected_tpr": p.expected_tpr,
                 "target_fpr": p.target_fpr}
                for p in cal.operating_points.values()],
            "metrics": self.detector.metrics_,
            "loaded_at": self.loaded_at,
        }


@dataclass
class ModelEntry:
    """Everything the registry knows about one model name."""

    name: str
    versions: dict[str, LoadedModel]
    default: str | None
    available: list[str]
    refused: dict[str, str]
    pinned: str | None = None
    #: Artifact hash of each version refused after it verified (so it is not loaded again).
    refused_sha: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.default is not None

    def describe(self) -> dict:
        """The JSON description used by ``/v1/models``."""
        return {
            "name": self.name,
            "ready": self.ready,
            "default_version": self.default,
            "pinned_version": self.pinned,
            "versions": [m.describe(default=v == self.default)
                         for v, m in sorted(self.versions.items(),
                                            key=lambda kv: version_key(kv[0]), reverse=True)],
            "available_versions": list(self.available),
            "refused_versions": [{"version": v, "error": e}
                                 for v, e in sorted(self.refused.items(),
                                                    key=lambda kv: version_key(kv[0]),
                                                    reverse=True)],
        }


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the loaded models; replaced as a whole by each reload."""

    models: dict[str, ModelEntry] = field(default_factory=dict)
    loaded: bool = False  # the first reload has finished
    error: str | None = None  # the directory could not be read at the last reload
    problems: tuple[str, ...] = ()  # entries of the directory that are not models
    reloaded_at: float | None = None


class Registry:
    """Loads the models directory and hands out :class:`LoadedModel` objects to requests."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = Path(settings.models_dir)
        self.snapshot = Snapshot()
        self._lock = asyncio.Lock()
        # Model calls and loads get their own threads: a reload must not queue behind
        # scoring, and scoring must not queue behind a reload.
        self._infer_pool = ThreadPoolExecutor(settings.inference_threads,
                                              thread_name_prefix="anomaly-infer")
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="anomaly-load")
        self.draining = False  # set on SIGTERM: not ready, still serving (service.shutdown)
        self._initial: asyncio.Task | None = None
        self._gauge_series: list[tuple] = []  # (gauge, labels) this registry has set
        metrics.SCORES.window = settings.drift_window

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the first load in the background, so /healthz answers while it runs."""
        self._initial = asyncio.get_running_loop().create_task(self.reload())

    async def wait_loaded(self) -> None:
        if self._initial is not None:
            await asyncio.shield(self._initial)

    def drain(self) -> None:
        """Report not ready from now on (SIGTERM): /readyz 503, ``anomaly_ready`` 0, while
        requests keep being served until the server stops."""
        self.draining = True
        metrics.READY.set(0)

    async def close(self) -> None:
        """Stop loading, let running model calls finish and drop this registry's metrics."""
        if self._initial is not None and not self._initial.done():
            self._initial.cancel()
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, self._infer_pool.shutdown)
        retired = [m for e in self.snapshot.models.values() for m in e.versions.values()]
        self.snapshot = Snapshot(loaded=True, error="shutting down")
        self._publish(self.snapshot, retired)

    # -- lookups ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every model in the directory has a loaded, warmed-up default version (and the
        server is not shutting down)."""
        snap = self.snapshot
        return (not self.draining and snap.loaded and snap.error is None and bool(snap.models)
                and all(e.ready for e in snap.models.values()))

    def not_ready_reason(self) -> str:
        snap = self.snapshot
        if self.draining:
            return "shutting down (draining in-flight requests)"
        if not snap.loaded:
            return "the models are still loading"
        if snap.error:
            return snap.error
        if not snap.models:
            return f"no model artifacts in {self.root}"
        waiting = sorted(n for n, e in snap.models.items() if not e.ready)
        return f"no loadable version of {waiting}" if waiting else "ready"

    def model_label(self, name: str | None) -> str:
        """A bounded metric label for a model name taken from a request."""
        if name is None:
            return ""
        return name if name in self.snapshot.models else metrics.OTHER_MODEL

    def entry(self, name: str) -> ModelEntry:
        """The model's entry; 404 when the directory has no such model."""
        snap = self.snapshot
        entry = snap.models.get(name)
        if entry is None:
            if not snap.loaded:
                raise ServiceError(503, "not_ready", "Expected the models to be loaded. "
                                   "Received: a request while they are still loading",
                                   headers={"Retry-After": "1"})
            raise expect(f"a model in {sorted(snap.models)}", repr(name), code="model_not_found",
                         status_code=404)
        return entry

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The model version to score with (the default version when ``version`` is None)."""
        entry = self.entry(name)
        if version is None:
            if entry.default is None:
                refused = "; ".join(f"{v}: {e}" for v, e in sorted(entry.refused.items()))
                raise ServiceError(503, "model_not_ready",
                                   f"Expected a loadable version of {name!r}. Received: none "
                                   f"loaded ({refused or 'no versions'})")
            return entry.versions[entry.default]
        model = entry.versions.get(version)
        if model is None:
            if version in entry.available:
                why = entry.refused.get(version) or (
                    f"not among the {self.settings.versions_per_model} newest loaded "
                    "(ANOMALY_VERSIONS_PER_MODEL)")
                raise expect(f"a loaded version of {name!r} in {sorted(entry.versions)}",
                             f"{version!r} ({why})", code="version_not_loaded", status_code=404)
            raise expect(f"a version of {name!r} in {sorted(entry.versions)}", repr(version),
                         code="version_not_found", status_code=404)
        return model

    # -- reload -----------------------------------------------------------------------------

    async def reload(self) -> dict:
        """Rescan the directory; load new versions; swap. Returns a report of what changed."""
        async with self._lock:
            try:
                return await self._reload()
            except Exception as exc:
                log.exception("model reload failed")
                metrics.MODEL_RELOADS.labels("error").inc()
                if not self.snapshot.loaded:  # or /readyz would say "loading" forever
                    self.snapshot = Snapshot(loaded=True, error=f"model loading failed: "
                                             f"{type(exc).__name__}: {exc}")
                    self._publish(self.snapshot, ())
                raise

    async def _reload(self) -> dict:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        old = self.snapshot
        metrics.MODEL_LAST_RELOAD.set_to_current_time()
        try:
            layout, problems = await loop.run_in_executor(self._load_pool, self._scan)
        except (OSError, AnomalyError, ServiceError) as exc:
            message = exc.message if isinstance(exc, ServiceError) else str(exc)
            log.error("cannot read the models directory: %s", message)
            metrics.MODEL_RELOADS.labels("error").inc()
            if not old.loaded:  # nothing to keep serving
                self.snapshot = Snapshot(loaded=True, error=message, reloaded_at=time.time())
                self._publish(self.snapshot, ())
            return {"error": message, "models": {}}
        pins = self.settings.pinned_versions
        report: dict = {"loaded": [], "unchanged": [], "refused": [], "removed": []}
        models: dict[str, ModelEntry] = {}
        for name, versions in layout.items():
            models[name] = await self._load_model(name, versions, pins.get(name),
                                                  old.models.get(name), report)
        for name, entry in old.models.items():
            for v in entry.versions:
                kept = models.get(name)
                if kept is None or v not in kept.versions:  # replaced ones count as loaded
                    report["removed"].append(f"{name}/{v}")
        new = Snapshot(models, loaded=True, problems=tuple(problems), reloaded_at=time.time())
        self.snapshot = new  # the swap: one assignment, seen by every later request
        retired = [m for e in old.models.values() for m in e.versions.values()
                   if not any(m is n for e2 in models.values() for n in e2.versions.values())]
        self._publish(new, retired)
        metrics.MODEL_RELOADS.labels("partial" if report["refused"] else "success").inc()
        report["models"] = {n: {"default_version": e.default, "loaded": sorted(e.versions),
                                "refused": e.refused} for n, e in models.items()}
        report["problems"] = list(problems)
        report["ready"] = self.ready
        report["duration_seconds"] = round(time.perf_counter() - started, 3)
        log.info("models reloaded in %.2fs: loaded %s, unchanged %s, refused %s, removed %s",
                 report["duration_seconds"], report["loaded"], report["unchanged"],
                 [r["version"] for r in report["refused"]], report["removed"])
        return report

    async def _load_model(self, name: str, versions: list[str], pin: str | None,
                          prev: ModelEntry | None, report: dict) -> ModelEntry:
        loop = asyncio.get_running_loop()
        order = list(reversed(versions))  # newest first
        refused: dict[str, str] = {}
        if pin is not None:
            if pin in versions:
                order.remove(pin)
                order.insert(0, pin)
            else:
                refused[pin] = f"pinned version not found in {self.root / name}"
        loaded: dict[str, LoadedModel] = {}
        refused_sha: dict[str, str] = {}
        for version in order:
            if len(loaded) >= self.settings.versions_per_model:
                break
            before = prev.versions.get(version) if prev else None
            earlier = prev.refused.get(version) if prev else None
            known_bad = prev.refused_sha.get(version) if prev else None
            try:
                model = await loop.run_in_executor(self._load_pool, self._load_version, name,
                                                   version, before, known_bad)
            except Exception as exc:  # refused: reported, counted once, never served
                if isinstance(exc, _Refusal):
                    msg = earlier if exc.known else exc.message
                    refused_sha[version] = exc.sha256
                else:
                    msg = str(exc) if isinstance(exc, AnomalyError) else (
                        f"{type(exc).__name__}: {exc}")
                refused[version] = msg
                report["refused"].append({"version": f"{name}/{version}", "error": msg})
                if msg != earlier:
                    metrics.MODEL_LOAD_FAILURES.labels(name).inc()
                    log.warning("refused %s/%s: %s", name, version, msg)
                if before is not None:
                    loaded[version] = before  # verified when it was loaded; keeps serving
                continue
            loaded[version] = model
            report["unchanged" if model is before else "loaded"].append(f"{name}/{version}")
        if pin is not None:
            default = pin if pin in loaded else None
        else:
            default = max(loaded, key=version_key) if loaded else None
        return ModelEntry(name, loaded, default, list(versions), refused, pin, refused_sha)

    def _scan(self) -> tuple[dict[str, list[str]], list[str]]:
        from anomaly.artifact import MANIFEST, check_name

        root = self.root
        if not root.is_dir():
            raise expect("a models directory (--models or ANOMALY_MODELS_DIR)",
                         f"{root} (not found)", code="reload_failed", status_code=503)
        if (root / MANIFEST).is_file():
            raise expect("a models directory of NAME/VERSION artifacts",
                         f"the artifact {root} itself; point it at the directory two levels up",
                         code="reload_failed", status_code=503)
        layout: dict[str, list[str]] = {}
        problems: list[str] = []
        for model_dir in sorted(root.iterdir()):
            if model_dir.name.startswith((".", "_")) or not model_dir.is_dir():
                continue
            try:
                check_name(model_dir.name)
            except AnomalyError as exc:
                problems.append(f"{model_dir.name}: {exc}")
                continue
            if (model_dir / MANIFEST).is_file():
                problems.append(f"{model_dir.name}: an artifact directly under the models "
                                "directory; move it to NAME/VERSION")
                continue
            versions = sorted((p.name for p in model_dir.iterdir()
                               if p.is_dir() and not p.name.startswith(".")), key=version_key)
            if versions:
                layout[model_dir.name] = versions
        return layout, problems

    def _load_version(self, name: str, version: str, before: LoadedModel | None,
                      known_bad: str | None = None) -> LoadedModel:
        """Verify, load and warm up one version (runs in the load thread).

        Returns ``before`` when the artifact is unchanged; raises :class:`_Refusal` without
        loading again when it is the artifact (hash ``known_bad``) that failed last time.
        """
        import anomaly._tf  # noqa: F401  (TensorFlow without its start-up noise)
        from anomaly.artifact import check_name, read_info
        from anomaly.detector import Detector

        check_name(version, "version name")
        path = self.root / name / version
        info = read_info(path)  # the manifest check: every file's SHA-256
        if before is not None and before.sha256 == info.sha256:
            return before
        if info.sha256 == known_bad:
            raise _Refusal("", info.sha256, known=True)
        started = time.perf_counter()
        try:
            det = Detector.load(path)
            pixels = pixel_shape(image_shape(det))
            for n in _WARMUP_SIZES:
                x = np.zeros((min(n, self.settings.max_batch_images), *pixels), np.float32)
                for full in (False, True):
                    out = det.detect(x, reconstruction=full, error_map=full, validated=True)
                    if not np.isfinite(out.scores).all():
                        raise ValueError("warm-up produced non-finite scores")
        except Exception as exc:
            msg = str(exc) if isinstance(exc, AnomalyError) else f"{type(exc).__name__}: {exc}"
            raise _Refusal(msg, info.sha256) from exc

        batch_size = metrics.INFERENCE_BATCH_SIZE.labels(name)

        def run(x: np.ndarray, operating_point: str, full: bool):
            batch_size.observe(len(x))
            return det.detect(x, operating_point=operating_point, reconstruction=full,
                              error_map=full, validated=True)

        batcher = MicroBatcher(run, self._infer_pool, max_images=self.settings.max_batch_images,
                               enabled=self.settings.micro_batching)
        return LoadedModel(name, version, path, det, det.artifact_sha256_, time.time(),
                           time.perf_counter() - started, batcher)

    # -- metrics ----------------------------------------------------------------------------

    def _publish(self, snap: Snapshot, retired: list[LoadedModel]) -> None:
        """Bring the registry gauges in line with ``snap`` (runs in the event loop).

        Only the series this registry set before are replaced, so two apps in one process
        (tests) do not erase each other's.
        """
        for m in retired:
            metrics.forget_version(m.name, m.version, owner=m)
        for gauge, labels in self._gauge_series:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        series: list[tuple] = []

        def put(gauge, labels: tuple, value: float) -> None:
            gauge.labels(*labels).set(value)
            series.append((gauge, labels))

        for name, entry in snap.models.items():
            put(metrics.MODEL_READY, (name,), 1 if entry.ready else 0)
            put(metrics.MODEL_REFUSED_VERSIONS, (name,), len(entry.refused))
            for version, m in entry.versions.items():
                meta = m.metadata
                put(metrics.MODEL_INFO, (name, version, m.sha256,
                                         str(meta.get("model_type", "")),
                                         str(meta.get("dataset", "")),
                                         "true" if version == entry.default else "false"), 1)
                for op in m.calibration.operating_points.values():
                    put(metrics.EXPECTED_ANOMALY_RATIO, (name, version, op.name),
                        op.expected_fpr)
                if not metrics.SCORES.has(name, version, m):
                    metrics.SCORES.add(name, version, m.calibration.reference_scores,
                                       [p.threshold for p in
                                        m.calibration.operating_points.values()], owner=m)
        self._gauge_series = series
        metrics.READY.set(1 if self.ready else 0)
