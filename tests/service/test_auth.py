"""Optional bearer-token auth: separate scoring and admin keys; health and metrics stay open."""

from __future__ import annotations

import logging

import pytest

from tests.service.conftest import blobs

SCORE_KEY = "score-key-123"
ADMIN_KEY = "admin-key-456"


@pytest.fixture(scope="module")
def auth_client(models_root):
    from tests.service.conftest import running_app

    with running_app(models_root, api_keys=f"{SCORE_KEY},other-score-key",
                     admin_api_keys=ADMIN_KEY) as c:
        yield c


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_open_routes_need_no_key(auth_client):
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/v2",
                 "/v2/health/live", "/v2/health/ready", "/v2/models/blobs/ready"):
        assert auth_client.get(path).status_code == 200, path


@pytest.mark.parametrize("method,path", [
    ("get", "/v1/models"), ("get", "/v1/models/blobs"), ("post", "/v1/models/blobs/score"),
    ("get", "/v2/models/blobs"), ("post", "/v2/models/blobs/infer")])
def test_scoring_routes_401_403_200(auth_client, method, path):
    call = getattr(auth_client, method)
    kwargs = {"json": {"images": blobs(1).tolist()}} if method == "post" else {}
    if path.endswith("/infer"):
        kwargs = {"json": {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 784],
                                       "data": blobs(1).ravel().tolist()}]}}
    missing = call(path, **kwargs)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert call(path, headers={"Authorization": "Basic abc"}, **kwargs).status_code == 401
    wrong = call(path, headers=bearer("nope"), **kwargs)
    assert wrong.status_code == 403
    assert call(path, headers=bearer(ADMIN_KEY), **kwargs).status_code == 403
    for r in (missing, wrong):
        err = r.json()["error"]
        message = err if path.startswith("/v2") else err["message"]
        assert message.startswith("Expected ") and SCORE_KEY not in r.text
    assert call(path, headers=bearer(SCORE_KEY), **kwargs).status_code == 200
    assert call(path, headers=bearer("other-score-key"), **kwargs).status_code == 200


def test_admin_route_takes_only_admin_keys(auth_client):
    assert auth_client.post("/v1/models/reload").status_code == 401
    assert auth_client.post("/v1/models/reload", headers=bearer(SCORE_KEY)).status_code == 403
    r = auth_client.post("/v1/models/reload", headers=bearer(ADMIN_KEY))
    assert r.status_code == 200 and sorted(r.json()["unchanged"]) == ["blobs/v1", "blobs/v2"]


def test_keys_are_never_logged(models_root, caplog):
    from tests.service.conftest import running_app

    with caplog.at_level(logging.DEBUG), running_app(models_root, api_keys=SCORE_KEY) as c:
        c.post("/v1/models/blobs/score", json={"images": blobs(1).tolist()},
               headers=bearer("a-wrong-key"))
        c.post("/v1/models/blobs/score", json={"images": blobs(1).tolist()},
               headers=bearer(SCORE_KEY))
    assert SCORE_KEY not in caplog.text and "a-wrong-key" not in caplog.text
    from service.settings import Settings

    assert SCORE_KEY not in repr(Settings(api_keys=SCORE_KEY))
