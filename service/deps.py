"""FastAPI dependencies as ``Annotated`` aliases: settings, registry and API-key checks.

API keys are optional bearer tokens (``Authorization: Bearer KEY``), one set for the scoring and
model routes (``ANOMALY_API_KEYS``) and one for the admin routes (``ANOMALY_ADMIN_API_KEYS``); a
set left empty leaves its routes open. Health, readiness, /metrics and the docs are always open.
A missing or malformed header is 401, a key that does not match is 403. Keys are compared in
constant time (over their SHA-256 digests, so the length does not leak either) and are never
logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.errors import expect
from service.registry import Registry
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:  # the app is served without its lifespan having run
        raise expect("a started service (lifespan run)", "a request before start-up",
                     code="not_ready", status_code=503)
    return registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]


def key_digests(keys) -> tuple[bytes, ...]:
    """SHA-256 digests of configured keys (``SecretStr``), computed once at start-up."""
    return tuple(hashlib.sha256(k.get_secret_value().encode()).digest() for k in keys)


def _check_bearer(request: Request, digests: tuple[bytes, ...], which: str) -> None:
    if not digests:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    header = request.headers.get("authorization")
    if not header:
        raise expect(f"an 'Authorization: Bearer <{which} key>' header", "no Authorization "
                     "header", code="unauthorized", status_code=401, headers=challenge)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise expect(f"an 'Authorization: Bearer <{which} key>' header", f"a {scheme!r} "
                     "Authorization header", code="unauthorized", status_code=401,
                     headers=challenge)
    given = hashlib.sha256(token.encode()).digest()
    match = False
    for d in digests:  # no early exit: the time does not depend on which key matched
        match |= hmac.compare_digest(given, d)
    if not match:
        raise expect(f"a valid {which} API key", "a key that is not valid for this route",
                     code="forbidden", status_code=403)


def require_scoring_key(request: Request) -> None:
    """Dependency of the scoring and model routes."""
    _check_bearer(request, request.app.state.scoring_key_digests, "scoring")


def require_admin_key(request: Request) -> None:
    """Dependency of the admin routes."""
    _check_bearer(request, request.app.state.admin_key_digests, "admin")


ScoringAuth = Depends(require_scoring_key)
AdminAuth = Depends(require_admin_key)
