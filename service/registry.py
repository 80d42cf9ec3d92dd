"""The model registry: what is served, swapped atomically on reload. No HTTP here.

Layout: ``MODELS_DIR/NAME/VERSION/`` artifacts written by ``anomaly fit`` (versions sort by
name, the last is the newest). Per model, the newest ``versions_per_model`` loadable versions
are kept loaded; the default one (served when a request names no version) is the pinned version
when ``ANOMALY_PINNED_VERSIONS`` names one, else the newest loaded.

A reload builds a complete new :class:`Snapshot` off to the side and then replaces the old one
in a single assignment. Requests pick the snapshot up once, when they start, and keep the
:class:`LoadedModel` they got until they finish, so a reload never fails or drops an in-flight
request. Each version is verified against its manifest (SHA-256), loaded in Keras safe mode and
warmed up (:mod:`service.loading`) before it can serve. A version that fails any step is
*refused*: it is reported in ``/v1/models`` and in ``anomaly_model_refused_versions`` /
``anomaly_model_load_failures_total``, and whatever served before keeps serving -- including
the in-memory copy of a version whose files changed on disk after it was loaded. Versions
whose artifact hash is unchanged are reused without reloading.

Seams: scanning, loading and warm-up are :mod:`service.loading`; the JSON descriptions are
:mod:`service.schemas` (``describe_model``); the gauges are published by
:class:`service.gauges.GaugePublisher`; HTTP lookups (404/503) are :mod:`service.deps`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from anomaly.artifact import version_key
from anomaly.errors import AnomalyError
from service.batching import MicroBatcher
from service.gauges import GaugePublisher
from service.loading import Refusal, load_version, scan
from service.metrics import OTHER_MODEL, ServiceMetrics
from service.settings import Settings

log = logging.getLogger("anomaly.service")


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

    def __init__(self, settings: Settings, metrics: ServiceMetrics):
        self.settings = settings
        self.root = Path(settings.models_dir)
        self.metrics = metrics
        self.snapshot = Snapshot()
        self._gauges = GaugePublisher(metrics)
        self._lock = asyncio.Lock()
        # Model calls and loads get their own threads: a reload must not queue behind
        # scoring, and scoring must not queue behind a reload.
        self._infer_pool = ThreadPoolExecutor(settings.inference_threads,
                                              thread_name_prefix="anomaly-infer")
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="anomaly-load")
        self.draining = False  # set on SIGTERM: not ready, still serving (service.shutdown)
        self._initial: asyncio.Task | None = None

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
        self.metrics.ready.set(0)

    async def close(self) -> None:
        """Stop loading, let running model calls finish and drop the served versions' series."""
        if self._initial is not None and not self._initial.done():
            self._initial.cancel()
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, self._infer_pool.shutdown)
        retired = [m for e in self.snapshot.models.values() for m in e.versions.values()]
        self._swap(Snapshot(loaded=True, error="shutting down"), retired)

    # -- state ------------------------------------------------------------------------------

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
        return name if name in self.snapshot.models else OTHER_MODEL

    def _swap(self, new: Snapshot, retired) -> None:
        self.snapshot = new  # the swap: one assignment, seen by every later request
        self._gauges.publish(new, retired, ready=self.ready)

    # -- reload -----------------------------------------------------------------------------

    async def reload(self) -> dict:
        """Rescan the directory; load new versions; swap. Returns a report of what changed
        (``{"error": ...}`` when the directory cannot be read: nothing changes then)."""
        async with self._lock:
            try:
                return await self._reload()
            except Exception as exc:
                log.exception("model reload failed")
                self.metrics.model_reloads.labels("error").inc()
                if not self.snapshot.loaded:  # or /readyz would say "loading" forever
                    self._swap(Snapshot(loaded=True, error=f"model loading failed: "
                                        f"{type(exc).__name__}: {exc}"), ())
                raise

    async def _reload(self) -> dict:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        old = self.snapshot
        self.metrics.model_last_reload.set_to_current_time()
        try:
            layout, problems = await loop.run_in_executor(self._load_pool, scan, self.root)
        except (OSError, AnomalyError) as exc:
            message = str(exc)
            log.error("cannot read the models directory: %s", message)
            self.metrics.model_reloads.labels("error").inc()
            if not old.loaded:  # nothing to keep serving
                self._swap(Snapshot(loaded=True, error=message, reloaded_at=time.time()), ())
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
        retired = [m for e in old.models.values() for m in e.versions.values()
                   if not any(m is n for e2 in models.values() for n in e2.versions.values())]
        self._swap(Snapshot(models, loaded=True, problems=tuple(problems),
                            reloaded_at=time.time()), retired)
        self.metrics.model_reloads.labels("partial" if report["refused"] else "success").inc()
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
                if isinstance(exc, Refusal):
                    msg = earlier if exc.known else exc.message
                    refused_sha[version] = exc.sha256
                else:
                    msg = str(exc) if isinstance(exc, AnomalyError) else (
                        f"{type(exc).__name__}: {exc}")
                refused[version] = msg
                report["refused"].append({"version": f"{name}/{version}", "error": msg})
                if msg != earlier:
                    self.metrics.model_load_failures.labels(name).inc()
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

    def _load_version(self, name: str, version: str, before: LoadedModel | None,
                      known_bad: str | None = None) -> LoadedModel:
        """Verify, load and warm up one version (runs in the load thread); ``before`` when
        its artifact is unchanged."""
        started = time.perf_counter()
        det, sha256 = load_version(self.root / name / version,
                                   same_as=before.sha256 if before else None,
                                   known_bad=known_bad,
                                   max_images=self.settings.max_batch_images)
        if det is None:
            return before
        batch_size = self.metrics.inference_batch_size.labels(name)

        def run(x, operating_point: str, full: bool):
            batch_size.observe(len(x))
            return det.detect(x, operating_point=operating_point, reconstruction=full,
                              error_map=full, validated=True)

        batcher = MicroBatcher(run, self._infer_pool, max_images=self.settings.max_batch_images,
                               enabled=self.settings.micro_batching)
        return LoadedModel(name, version, self.root / name / version, det, sha256, time.time(),
                           time.perf_counter() - started, batcher)
