"""The service's one settings object, read from ``ANOMALY_*`` environment variables.

``anomaly serve`` maps its flags onto the same fields (flags win over the environment), so
``anomaly serve --models DIR --port 9000`` and
``ANOMALY_MODELS_DIR=DIR ANOMALY_PORT=9000 uvicorn service.app:app`` configure the same thing
(uvicorn's own ``--host``/``--port`` flags apply to plain ``uvicorn``).

List settings take comma-separated values, e.g. ``ANOMALY_API_KEYS=key1,key2`` and
``ANOMALY_PINNED_VERSIONS=digits=20261123T154700Z,shirts=v3``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from anomaly.errors import ConfigError, expected


def _split(value) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value or [])


class Settings(BaseSettings):
    """Configuration of the scoring service (environment prefix ``ANOMALY_``)."""

    model_config = SettingsConfigDict(env_prefix="ANOMALY_", extra="ignore", frozen=True)

    models_dir: Path = Field(Path("models"), description="Models directory: NAME/VERSION/ "
                             "artifacts, as written by 'anomaly fit'.")
    host: str = Field("127.0.0.1", description="Bind address ('anomaly serve' only); "
                      "0.0.0.0 in a container.")
    port: int = Field(8000, ge=0, le=65535, description="Port ('anomaly serve' only).")
    workers: int = Field(1, description="Server processes. Always 1: the service runs one "
                         "worker per process and scales by replicas.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = True
    pinned_versions: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="NAME=VERSION pairs served instead of the newest.")
    versions_per_model: int = Field(2, ge=1, description="Newest loadable versions kept "
                                    "loaded per model (the pinned one is added).")
    max_batch_images: int = Field(256, ge=1, le=4096, description="Most images per request.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request "
                                "body; larger ones get 413 (chunked uploads included).")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest encoded "
                                  "PNG/JPEG (width x height) accepted before resizing.")
    max_request_pixels: int = Field(4096 * 4096, ge=1, description="Most decoded pixels "
                                    "(width x height, summed over a request's PNG/JPEG "
                                    "images), checked from the image headers before any "
                                    "decoding.")
    max_json_depth: int = Field(32, ge=4, le=512, description="Deepest nesting of arrays and "
                                "objects in a JSON body, checked before parsing.")
    max_json_keys: int = Field(1000, ge=16, description="Most object keys in a JSON body, "
                               "checked before parsing.")
    max_queued_images: int = Field(1024, ge=1, description="Most images admitted at once "
                                   "(decoded, waiting for or in a model call); above it "
                                   "scoring requests get 503 with Retry-After.")
    cpu_threads: int = Field(2, ge=1, le=64, description="Threads that parse, validate and "
                             "decode request bodies and encode responses, off the event loop.")
    # Each request leaves a few dozen container objects (its parsed JSON, the framework's
    # scope and state): at Python's default of 700 the young-generation collections took
    # about 5% of single-image serving at concurrency 8 (1,462 against 1,530 images/s with
    # 50,000, medians of three alternating 8 s runs; 7% with the collector off).
    gc_threshold: int = Field(50_000, ge=0, description="Allocations between the garbage "
                              "collector's young-generation passes while serving "
                              "(gc.set_threshold); 0 keeps Python's own (700).")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys for the scoring and model routes; "
        "empty = open.")
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys for the admin routes; empty = "
        "closed unless admin_open.")
    admin_open: bool = Field(False, description="Leave the admin routes open to anyone when "
                             "no admin key is set (for a trusted network only).")
    micro_batching: bool = Field(True, description="Merge concurrent requests for one model "
                                 "into one model call.")
    inference_threads: int = Field(1, ge=1, le=64, description="Threads running model calls.")
    drift_window: int = Field(1000, ge=10, description="Live scores per model version in the "
                              "drift statistics' rolling window.")
    graceful_shutdown_seconds: float = Field(30.0, ge=0, description="How long 'anomaly serve' "
                                             "lets in-flight requests finish on SIGTERM.")
    shutdown_drain_seconds: float = Field(0.0, ge=0, le=300, description="On SIGTERM, how "
                                          "long to keep serving with readiness 503 before "
                                          "the graceful shutdown starts (time for the load "
                                          "balancer to take the instance out).")

    @field_validator("workers")
    @classmethod
    def _one_worker(cls, v: int) -> int:
        if v != 1:
            raise ValueError("the service runs one worker per process and scales by replicas "
                             "(several processes behind a load balancer), so workers must be 1")
        return v

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _keys(cls, v):
        return [k.get_secret_value() if isinstance(k, SecretStr) else k for k in _split(v)]

    @field_validator("pinned_versions", mode="before")
    @classmethod
    def _pins(cls, v):
        if isinstance(v, dict):
            return v
        out = {}
        for pair in _split(v):
            name, sep, version = pair.partition("=")
            if not sep or not name.strip() or not version.strip():
                raise ValueError(f"expected NAME=VERSION pairs, got {pair!r}")
            out[name.strip()] = version.strip()
        return out


#: The settings that ``anomaly serve`` also takes as flags (service/cli.py); the others are
#: read from the environment only, and an error about them names the variable alone.
FLAGS = {"models_dir": "--models", "host": "--host", "port": "--port", "workers": "--workers"}


def load_settings(**overrides) -> Settings:
    """Settings from the environment with ``overrides`` (``None`` values ignored) on top.

    Raises :class:`ConfigError` with one readable line instead of pydantic's report.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        source = f"ANOMALY_{field.upper()}"
        if field in FLAGS:
            source = f"{FLAGS[field]} or {source}"
        msg = err["msg"].removeprefix("Value error, ")
        # Never echo what might be a key.
        received = "(hidden)" if "key" in field else repr(err.get("input"))[:80]
        raise expected(f"a valid {source} ({msg})", received, cls=ConfigError) from None
