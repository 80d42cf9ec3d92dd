"""FastAPI dependencies as ``Annotated`` aliases (settings, registry, metrics, API-key checks)
and the HTTP lookups of models and versions (404/503).

API keys are optional bearer tokens (``Authorization: Bearer KEY``), one set for the scoring and
model routes (``ANOMALY_API_KEYS``, empty = open) and one for the admin routes
(``ANOMALY_ADMIN_API_KEYS``; empty = closed, unless ``ANOMALY_ADMIN_OPEN=1``). Health, readiness,
/metrics and the docs are always open. A missing or malformed header is 401, a key that does not
match is 403. The checks are dependencies, so they run before a route reads its body (the body
limit reads lazily, see :mod:`service.middleware`): an unauthenticated body is never read. Keys are compared in
constant time (over their SHA-256 digests, so the length does not leak either) and are never
logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, NamedTuple

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ServiceError, expect
from service.metrics import ServiceMetrics
from service.registry import LoadedModel, ModelEntry, Registry
from service.settings import Settings


# Every dependency is ``async def``: FastAPI runs a plain ``def`` one in a worker thread, a
# hand-off per dependency per request (four on a scoring route) for a few attribute reads.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:  # the app is served without its lifespan having run
        raise expect("a started service (lifespan run)", "a request before start-up",
                     code="not_ready", status_code=503)
    return registry


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


class Scoring(NamedTuple):
    registry: Registry
    settings: Settings
    metrics: ServiceMetrics


async def get_scoring(request: Request) -> Scoring:
    """The three things a scoring route needs, as one dependency: FastAPI solves each
    dependency per request (~6 us apiece), and the scoring routes are the hot path."""
    state = request.app.state
    return Scoring(await get_registry(request), state.settings, state.metrics)


ScoringDep = Annotated[Scoring, Depends(get_scoring)]


def find_entry(registry: Registry, name: str) -> ModelEntry:
    """The model's entry; 404 when the directory has no such model (503 while loading)."""
    snap = registry.snapshot
    entry = snap.models.get(name)
    if entry is None:
        if not snap.loaded:
            raise ServiceError(503, "not_ready", "Expected the models to be loaded. "
                               "Received: a request while they are still loading",
                               headers={"Retry-After": "1"})
        raise expect(f"a model in {sorted(snap.models)}", repr(name[:100]),
                     code="model_not_found", status_code=404)
    return entry


def find_model(registry: Registry, name: str, version: str | None = None) -> LoadedModel:
    """The model version to score with (the default version when ``version`` is None)."""
    entry = find_entry(registry, name)
    if version is None:
        if entry.default is None:
            refused = "; ".join(f"{v}: {e}" for v, e in sorted(entry.refused.items()))
            raise ServiceError(503, "model_not_ready",
                               f"Expected a loadable version of {name!r}. Received: none "
                               f"loaded ({refused or 'no versions'})")
        return entry.versions[entry.default]
    model = entry.versions.get(version)
    if model is None:
        shown = repr(version[:100])
        if version in entry.available:
            why = entry.refused.get(version) or (
                f"not among the {registry.settings.versions_per_model} newest loaded "
                "(ANOMALY_VERSIONS_PER_MODEL)")
            raise expect(f"a loaded version of {name!r} in {sorted(entry.versions)}",
                         f"{shown} ({why})", code="version_not_loaded", status_code=404)
        raise expect(f"a version of {name!r} in {sorted(entry.versions)}", shown,
                     code="version_not_found", status_code=404)
    return model


def key_digests(keys) -> tuple[bytes, ...]:
    """SHA-256 digests of configured keys (``SecretStr``), computed once at start-up."""
    return tuple(hashlib.sha256(k.get_secret_value().encode()).digest() for k in keys)


# auto_error=False: FastAPI's own 401/403 bodies are not this service's error format, so the
# scheme only reads the header (and documents it in /openapi.json, which gives /docs its
# Authorize button); the checks below answer.
_scoring_bearer = HTTPBearer(auto_error=False, scheme_name="scoringKey",
                             description="A key of ANOMALY_API_KEYS (when set).")
_admin_bearer = HTTPBearer(auto_error=False, scheme_name="adminKey",
                           description="A key of ANOMALY_ADMIN_API_KEYS.")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_scoring_bearer)]
AdminBearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)]


def _check_bearer(credentials: HTTPAuthorizationCredentials | None,
                  digests: tuple[bytes, ...], which: str) -> None:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials.strip():
        # Whatever the header held is never quoted back: "Bearersk-..." (no space) is a key.
        raise expect(f"an 'Authorization: Bearer <{which} key>' header", "no Authorization "
                     "header with the Bearer scheme", code="unauthorized", status_code=401,
                     headers=challenge)
    given = hashlib.sha256(credentials.credentials.strip().encode()).digest()
    match = False
    for d in digests:  # no early exit: the time does not depend on which key matched
        match |= hmac.compare_digest(given, d)
    if not match:
        raise expect(f"a valid {which} API key", "a key that is not valid for this route",
                     code="forbidden", status_code=403)


async def require_scoring_key(request: Request, credentials: Bearer) -> None:
    """Dependency of the scoring and model routes: open when no scoring key is set."""
    digests = request.app.state.scoring_key_digests
    if digests:
        _check_bearer(credentials, digests, "scoring")


async def require_admin_key(request: Request, credentials: AdminBearer) -> None:
    """Dependency of the admin routes: closed unless an admin key is set (and given) or the
    operator opted in with ``ANOMALY_ADMIN_OPEN=1``."""
    digests = request.app.state.admin_key_digests
    if digests:
        _check_bearer(credentials, digests, "admin")
    elif not request.app.state.settings.admin_open:
        raise expect("an admin key to be configured (ANOMALY_ADMIN_API_KEYS), or the admin "
                     "routes opened with ANOMALY_ADMIN_OPEN=1", "a request to an admin route "
                     "of a service without either", code="forbidden", status_code=403)


ScoringAuth = Depends(require_scoring_key)
AdminAuth = Depends(require_admin_key)
