"""Regression suite of issue #15: hostile requests, each against a real server process and a
TestClient app.

Every case asserts the status and error code, that the server log has no traceback, and (on the
real server) that ``/healthz`` and ``/metrics`` kept answering within :data:`BOUND_S` while the
hostile request ran (see :meth:`Probe.check`): one request must never stall the others.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import statistics
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import Server, blobs, running_app, save_version

KEY = "sk-hostile-scoring-0123456789"
ADMIN_KEY = "sk-hostile-admin-9876543210"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = np.rint(blobs(1)[0] * 255).astype(int).tolist()
SCORE = "/v1/models/blobs/score"
INFER = "/v2/models/blobs/infer"
#: How long /healthz and /metrics may take while a hostile request runs. 50 ms is the target of
#: the issue; a CI machine shared with other jobs may raise it (ANOMALY_TEST_HEALTH_BOUND_S).
BOUND_S = float(os.environ.get("ANOMALY_TEST_HEALTH_BOUND_S", "0.05"))


def nested(depth: int) -> str:
    """JSON text of an array nested ``depth`` levels (json.dumps would recurse)."""
    return "[" * depth + "]" * depth


def v1_body(field: str, depth: int) -> bytes:
    return (f'{{"images": [{json.dumps(GOOD)}], "{field}": {nested(depth)}}}').encode()


def v2_tensor(**overrides) -> dict:
    t = {"name": "images", "datatype": "UINT8", "shape": [1, 28, 28],
         "data": [p for row in GOOD for p in row]}
    t.update(overrides)
    return t


_MARK = "__NESTED__"
#: Where a nested value goes in a V2 request (issue #15's list).
V2_FIELDS = {
    "id": {"id": _MARK, "inputs": [v2_tensor()]},
    "inputs[0].name": {"inputs": [v2_tensor(name=_MARK)]},
    "datatype": {"inputs": [v2_tensor(datatype=_MARK)]},
    "a shape entry": {"inputs": [v2_tensor(shape=[1, _MARK, 28])]},
    "parameters.operating_point": {"parameters": {"operating_point": _MARK},
                                   "inputs": [v2_tensor()]},
    "binary_data_output": {"parameters": {"binary_data_output": _MARK},
                           "inputs": [v2_tensor()]},
    "outputs[].parameters.binary_data": {
        "inputs": [v2_tensor()],
        "outputs": [{"name": "anomaly_score", "parameters": {"binary_data": _MARK}}]},
}
V1_FIELDS = ("operating_point", "image_format", "return_error_map")


def v2_body(case: str, depth: int) -> bytes:
    return json.dumps(V2_FIELDS[case]).replace(f'"{_MARK}"', nested(depth)).encode()


def error_of(resp) -> tuple[str | None, str]:
    """(code, message) of an error in either format (V2 has no code)."""
    err = resp.json()["error"]
    if isinstance(err, str):
        return None, err
    return err["code"], err["message"]


def check(resp, status: int, code: str | None, *, max_message: int = 400) -> str:
    assert resp.status_code == status, resp.text[:500]
    got, message = error_of(resp)
    if code is not None and got is not None:
        assert got == code, resp.text[:500]
    assert message.startswith("Expected ") and ". Received: " in message, message[:500]
    assert len(message) <= max_message, f"unbounded message ({len(message)} chars)"
    assert "Traceback" not in resp.text
    return message


class Probe:
    """Polls /healthz and /metrics in a thread while the block runs; records each latency."""

    def __init__(self, url: str, headers: dict | None = None):
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            c.get("/healthz")  # connect first: the probe measures answers, not handshakes
            i = 0
            while not self._stop.is_set():
                path = "/metrics" if i % 4 == 3 else "/healthz"
                i += 1
                t0 = time.perf_counter()
                try:
                    r = c.get(path)
                    if r.status_code != 200:
                        self.failures.append(f"{path}: {r.status_code}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{path}: {exc!r}")
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(0.005)

    def __enter__(self) -> Probe:
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self) -> None:
        assert not self.failures, self.failures[:3]
        assert len(self.latencies) >= 3, "the probe did not run"
        # A stalled event loop delays every probe of the stall (before #15: 2.6-9 s). One
        # late probe below 4x the bound is the OS scheduler of a shared 2-core machine.
        late = sorted(t for t in self.latencies if t > BOUND_S)
        assert not late or (len(late) == 1 and late[0] <= 4 * BOUND_S), (
            f"/healthz or /metrics took {[round(t * 1000) for t in late]} ms (bound "
            f"{BOUND_S * 1000:.0f} ms; median {statistics.median(self.latencies) * 1000:.1f} "
            f"ms, {len(self.latencies)} probes)")


@pytest.fixture(scope="module")
def servers(detector, tmp_path_factory):
    """Two real servers: ``keyed`` (scoring and admin keys, a small in-flight image limit) and
    ``bare`` (no keys at all, admin routes left at their default)."""
    made = {}
    for name, env in (("keyed", {"ANOMALY_API_KEYS": KEY, "ANOMALY_ADMIN_API_KEYS": ADMIN_KEY,
                                 "ANOMALY_MAX_QUEUED_IMAGES": "4",
                                 "ANOMALY_MAX_BATCH_IMAGES": "8"}),
                      ("bare", {"ANOMALY_ADMIN_OPEN": "0"})):
        root = tmp_path_factory.mktemp(f"hostile-{name}") / "models"
        save_version(detector, root, "blobs", "v1")
        made[name] = Server(root, **env)
    try:
        for srv in made.values():
            srv.wait_ready()
        yield made
    finally:
        for srv in made.values():
            srv.stop()
        for name, srv in made.items():
            assert "Traceback" not in srv.output(), f"{name}:\n{srv.output()}"


@pytest.fixture(scope="module")
def keyed(servers):
    return servers["keyed"]


@pytest.fixture(scope="module")
def tc(models_root):
    """A TestClient app with keys whose JSON depth limit lets 500-level values reach the
    validators (the real servers keep the default, 32)."""
    with running_app(models_root, api_keys=KEY, admin_api_keys=ADMIN_KEY, max_json_depth=512,
                     max_body_bytes=1 << 20) as c:
        yield c


def post_hostile(server: Server, path: str, **kwargs) -> httpx.Response:
    """POST to the real server while a probe watches /healthz; checks the probe and the log."""
    with Probe(server.url) as probe, httpx.Client(base_url=server.url, timeout=60) as c:
        resp = c.post(path, **kwargs)
    probe.check()
    assert "Traceback" not in server.output()
    return resp


JSON = {"content-type": "application/json", **AUTH}


# -- a. deep nesting ----------------------------------------------------------------------------

@pytest.mark.parametrize("field", V1_FIELDS)
def test_v1_deeply_nested_field_is_refused_before_parsing(keyed, field):
    resp = post_hostile(keyed, SCORE, content=v1_body(field, 1000), headers=JSON)
    msg = check(resp, 400, "json_too_complex")
    assert "ANOMALY_MAX_JSON_DEPTH" in msg and "32" in msg


@pytest.mark.parametrize("case", list(V2_FIELDS))
def test_v2_deeply_nested_field_is_refused_before_parsing(keyed, case):
    resp = post_hostile(keyed, INFER, content=v2_body(case, 1000), headers=JSON)
    assert "ANOMALY_MAX_JSON_DEPTH" in check(resp, 400, None)


@pytest.mark.parametrize("field", V1_FIELDS)
def test_v1_nested_value_below_the_limit_is_described_not_recursed(tc, field):
    for depth in (500, 1000):  # 1000: above this app's limit of 512
        resp = tc.post(SCORE, content=v1_body(field, depth), headers=JSON)
        if depth > 512:
            check(resp, 400, "json_too_complex")
        else:
            msg = check(resp, 422, "validation_error")
            assert field in msg and "a JSON array [[[" in msg


@pytest.mark.parametrize("case", list(V2_FIELDS))
def test_v2_nested_value_below_the_limit_is_described_not_recursed(tc, case):
    msg = check(tc.post(INFER, content=v2_body(case, 500), headers=JSON), 400, None)
    assert "a JSON array [[[" in msg


# -- b. one request must not stall the others ----------------------------------------------------

def big_png(side: int = 4096) -> bytes:
    buf = io.BytesIO()
    img = np.zeros((side, side), np.uint8)
    img[side // 4 : side // 2, side // 4 : side // 2] = 200
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@pytest.fixture(scope="module")
def png_4096() -> bytes:
    return big_png()


def test_eight_huge_pngs_are_refused_from_their_headers(keyed, png_4096):
    files = [("images", (f"big{i}.png", png_4096, "image/png")) for i in range(8)]
    t0 = time.perf_counter()
    resp = post_hostile(keyed, SCORE, files=files, headers=AUTH)
    msg = check(resp, 422, "too_many_pixels")
    assert "ANOMALY_MAX_REQUEST_PIXELS" in msg
    assert time.perf_counter() - t0 < 5


def test_one_huge_png_is_decoded_off_the_event_loop(keyed, png_4096):
    resp = post_hostile(keyed, SCORE, files=[("images", ("big.png", png_4096, "image/png"))],
                        headers=AUTH)
    assert resp.status_code == 200, resp.text
    b64 = base64.b64encode(png_4096).decode()
    resp = post_hostile(keyed, SCORE, json={"images": [b64, b64]}, headers=AUTH)
    check(resp, 422, "too_many_pixels")


def million_keys_body(n: int = 1_000_000) -> bytes:
    keys = ",".join(f'"k{i}":0' for i in range(n))
    return f'{{"images": [{json.dumps(GOOD)}], {keys}}}'.encode()


def test_a_million_unknown_keys_are_counted_not_validated(keyed):
    body = million_keys_body()
    t0 = time.perf_counter()
    resp = post_hostile(keyed, SCORE, content=body, headers=JSON)
    assert "ANOMALY_MAX_JSON_KEYS" in check(resp, 400, "json_too_complex")
    resp = post_hostile(keyed, INFER, content=body.replace(b'"images"', b'"id": "x", "inputs"',
                                                           1), headers=JSON)
    assert "ANOMALY_MAX_JSON_KEYS" in check(resp, 400, None)
    assert time.perf_counter() - t0 < 10


def test_a_gzip_bomb_is_cut_off_at_the_body_limit(keyed, tc):
    import gzip

    bomb = gzip.compress(b" " * (64 << 20), compresslevel=9)  # 64 MiB of spaces, ~64 KiB
    headers = {**JSON, "content-encoding": "gzip"}
    resp = post_hostile(keyed, INFER, content=bomb, headers=headers)
    assert "ANOMALY_MAX_BODY_BYTES" in check(resp, 413, None)
    check(tc.post(INFER, content=bomb, headers=headers), 413, None)


def test_unknown_keys_in_testclient(tc):
    body = million_keys_body(5000)
    check(tc.post(SCORE, content=body, headers=JSON), 400, "json_too_complex")


# -- c. unauthenticated bodies are never read ----------------------------------------------------

def raw_exchange(port: int, head: bytes, timeout: float = 5.0) -> bytes:
    """Send ``head`` (request line and headers, no body) and return the start of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                return reply
            reply += chunk
        headers, _, body = reply.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in headers.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return headers + b"\r\n\r\n" + body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_request_without_key_is_refused_from_its_headers(keyed, framing):
    length = ("Content-Length: 10000000" if framing == "content-length"
              else "Transfer-Encoding: chunked")
    head = (f"POST {SCORE} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"{length}\r\n\r\n").encode()
    with Probe(keyed.url) as probe:
        t0 = time.perf_counter()
        reply = raw_exchange(keyed.port, head)  # the body never comes: the answer must
    probe.check()
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b'"unauthorized"' in reply and time.perf_counter() - t0 < 2


def test_client_leaving_mid_body_is_no_server_error(keyed):
    for path in (SCORE, INFER):
        head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Length: 100000\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", keyed.port), timeout=5) as s:
            s.sendall(head + b'{"images": [[[0, 1')
            time.sleep(0.2)
        time.sleep(0.3)
    with httpx.Client(base_url=keyed.url, timeout=10) as c:
        assert c.get("/healthz").status_code == 200
        assert 'outcome="server_error"' not in c.get("/metrics").text
    assert "Traceback" not in keyed.output()


def test_oversized_declared_body_with_a_key_is_413_without_reading_it(keyed):
    head = (f"POST {SCORE} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: 999999999\r\n\r\n").encode()
    reply = raw_exchange(keyed.port, head)
    assert reply.startswith(b"HTTP/1.1 413") and b"payload_too_large" in reply, reply[:300]


def test_testclient_auth_comes_before_the_body_limit(tc):
    body = b'{"images": [' + b"0," * 600_000 + b"0]}"  # above this app's 1 MiB limit
    check(tc.post(SCORE, content=body, headers={"content-type": "application/json"}), 401,
          "unauthorized")
    check(tc.post(SCORE, content=body, headers=JSON), 413, "payload_too_large")


# -- d. keys are never echoed -------------------------------------------------------------------

@pytest.mark.parametrize("header", [f"Bearer{KEY}", f"bearer:{KEY}", f"Basic {KEY}",
                                    f"{KEY}", "Bearer sk-almost-right"])
def test_malformed_authorization_is_never_quoted_back(keyed, tc, header):
    for resp in (post_hostile(keyed, SCORE, json={"images": [GOOD]},
                              headers={"Authorization": header}),
                 tc.post(SCORE, json={"images": [GOOD]}, headers={"Authorization": header})):
        status = 403 if header.startswith("Bearer ") else 401
        check(resp, status, "forbidden" if status == 403 else "unauthorized")
        assert KEY not in resp.text and "almost-right" not in resp.text
        assert header not in resp.text


# -- e. admin routes closed by default ----------------------------------------------------------

def test_admin_routes_refuse_without_admin_key_unless_opened(servers, models_root):
    bare = servers["bare"]
    resp = post_hostile(bare, "/v1/models/reload")
    assert "ANOMALY_ADMIN_OPEN" in check(resp, 403, "forbidden")
    resp = post_hostile(servers["keyed"], "/v1/models/reload",
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 200, resp.text
    with running_app(models_root, admin_open=False) as c:
        check(c.post("/v1/models/reload"), 403, "forbidden")
    with running_app(models_root, admin_open=True) as c:
        assert c.post("/v1/models/reload").status_code == 200


# -- f. the OpenAPI document says what the server accepts ---------------------------------------

def refs(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def check_openapi(spec: dict) -> None:
    for ref in refs(spec):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"], f"unresolved {ref}"
    for path in ("/v1/models/{name}/score", "/v1/models/{name}/versions/{version}/score"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]
        form = body["multipart/form-data"]
        assert form["schema"]["properties"]["images"]["minItems"] == 1
        assert "image/png" in form["encoding"]["images"]["contentType"]
        images = body["application/json"]["schema"]["properties"]["images"]
        assert images["minItems"] == 1 and images["maxItems"] >= 1
        # The loaded models are 28x28: the document says so.
        arr = images["items"]["oneOf"][0]
        assert arr["minItems"] == arr["maxItems"] == 28
    for path in ("/v2/models/{model_name}/infer",
                 "/v2/models/{model_name}/versions/{version}/infer"):
        op = spec["paths"][path]["post"]
        assert set(op["requestBody"]["content"]) == {"application/json"}
        assert "Inference-Header-Content-Length" in op["requestBody"]["description"]
    assert {"scoringKey", "adminKey"} <= set(spec["components"]["securitySchemes"])


def test_openapi_describes_what_is_accepted(keyed, tc):
    with Probe(keyed.url) as probe:
        spec = httpx.get(keyed.url + "/openapi.json", timeout=30).json()
    probe.check()
    check_openapi(spec)
    check_openapi(tc.get("/openapi.json").json())


def test_multipart_without_an_image_file_is_refused_as_documented(tc):
    check(tc.post(SCORE, data={"operating_point": "fpr@1%"}, files={"x": ("", b"")},
                  headers=AUTH), 422, None)
    check(tc.post(SCORE, files={"images": (None, b"text")}, headers=AUTH), 422,
          "validation_error")


# -- g. load shedding ---------------------------------------------------------------------------

def test_over_the_in_flight_limit_is_503_with_retry_after_then_recovers(keyed):
    import asyncio

    body = {"images": blobs(4, seed=3).tolist(), "return_reconstruction": True}

    async def burst():
        async with httpx.AsyncClient(base_url=keyed.url, timeout=60, headers=AUTH) as c:
            return await asyncio.gather(*(c.post(SCORE, json=body) for _ in range(24)))

    with Probe(keyed.url) as probe:
        replies = asyncio.run(burst())
    probe.check()
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses, statuses
    for r in replies:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert "ANOMALY_MAX_QUEUED_IMAGES" in check(r, 503, "overloaded")
    with httpx.Client(base_url=keyed.url, timeout=30, headers=AUTH) as c:
        assert c.post(SCORE, json=body).status_code == 200  # recovered
        metrics = c.get("/metrics").text
    assert 'code="503"' in metrics
    assert "Traceback" not in keyed.output()


def test_admission_counts_requests_then_images_and_admits_a_lone_large_request():
    from service.errors import ServiceError
    from service.scoring import Admission

    adm = Admission(4)
    with adm.ticket() as alone:
        alone.resize(10)  # idle: admitted whatever its size
        assert adm.images == 10
        with pytest.raises(ServiceError) as exc, adm.ticket():
            pass
        assert exc.value.status_code == 503 and exc.value.headers["Retry-After"] == "1"
    assert adm.images == 0
    with adm.ticket() as a, adm.ticket() as b:
        assert adm.images == 2  # a request being read or decoded counts as one image
        a.resize(2)
        with pytest.raises(ServiceError):
            b.resize(3)  # 2 + 3 > 4
        b.resize(2)
        assert adm.images == 4
        with pytest.raises(ServiceError), adm.ticket():
            pass
    assert adm.images == 0
