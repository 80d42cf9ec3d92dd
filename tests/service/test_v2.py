"""The Open Inference Protocol routes through TestClient: JSON and binary tensor data, outputs,
ids, versions, health, and the V2 error format (``{"error": "..."}``) for every bad input.
(tritonclient itself runs against the real server in test_server.py.)"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from tests.service.conftest import bars, blobs

URL = "/v2/models/blobs/infer"
X = np.concatenate([blobs(3, seed=80), bars(1, seed=81)])


def tensor(x: np.ndarray, datatype: str = "FP32", **extra) -> dict:
    return {"name": "images", "datatype": datatype, "shape": list(x.shape),
            "data": x.ravel().tolist(), **extra}


def binary_request(header: dict, *blobs_: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs_), {"Inference-Header-Content-Length": str(len(head)),
                                     "content-type": "application/octet-stream"}


def split_binary(resp) -> tuple[dict, dict[str, bytes]]:
    n = int(resp.headers["inference-header-content-length"])
    head = json.loads(resp.content[:n])
    out, offset = {}, n
    for o in head["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[o["name"]] = resp.content[offset : offset + size]
            offset += size
    return head, out


def v2_error(resp, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert body["error"].startswith("Expected ") and "Received: " in body["error"]
    return body["error"]


def test_health_metadata_and_readiness(client):
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/blobs/ready").status_code == 200
    assert client.get("/v2/models/blobs/versions/v1/ready").status_code == 200
    assert client.get("/v2/models/blobs/versions/v9/ready").status_code == 400
    v2_error(client.get("/v2/models/nope/ready"), 404)
    meta = client.get("/v2/models/blobs").json()
    assert meta["versions"] == ["v2", "v1"] and meta["inputs"][0]["shape"] == [-1, 28, 28]
    # What is accepted, not only the preferred form: every datatype and both shapes.
    accepted = meta["inputs"][0]["parameters"]
    assert accepted == {"datatypes": ["FP32", "FP64", "UINT8"],
                        "shapes": [[-1, 28, 28], [-1, 784]]}
    assert meta["parameters"]["default_outputs"] == ["anomaly_score", "is_anomaly"]
    assert client.get("/v2/models/blobs/versions/v1").json()["versions"] == ["v1"]
    v2_error(client.get("/v2/models/nope"), 404)
    v2_error(client.get("/v2/nowhere"), 404)


def test_json_infer_default_outputs_and_id(client):
    """Without ``outputs`` the reply is the score and the decision: no reconstruction."""
    r = client.post(URL, json={"id": "abc", "inputs": [tensor(X)]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"] == "abc" and body["model_name"] == "blobs" and body["model_version"] == "v2"
    assert [o["name"] for o in body["outputs"]] == ["anomaly_score", "is_anomaly"]


def test_json_infer_all_outputs(client, detector):
    names = ["anomaly_score", "is_anomaly", "reconstruction"]
    r = client.post(URL, json={"inputs": [tensor(X)], "outputs": [{"name": n} for n in names]})
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert list(outs) == names
    expected = detector.detect(X, reconstruction=True)
    assert outs["anomaly_score"]["datatype"] == "FP64" and outs["anomaly_score"]["shape"] == [4]
    np.testing.assert_array_equal(outs["anomaly_score"]["data"], expected.scores)
    assert outs["is_anomaly"]["data"] == expected.is_anomaly.tolist()
    assert outs["reconstruction"]["shape"] == [4, 28, 28]
    np.testing.assert_allclose(np.reshape(outs["reconstruction"]["data"], (4, 28, 28)),
                               expected.reconstruction, rtol=1e-6, atol=1e-7)


def test_requested_outputs_are_honoured_in_order(client):
    r = client.post(URL, json={"inputs": [tensor(X)], "outputs": [
        {"name": "is_anomaly"}, {"name": "anomaly_score"}]})
    assert [o["name"] for o in r.json()["outputs"]] == ["is_anomaly", "anomaly_score"]
    assert "id" not in r.json()


def test_binary_request_and_binary_outputs(client, detector):
    x784 = X.reshape(len(X), 784)
    header = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [4, 784],
                          "parameters": {"binary_data_size": x784.nbytes}}],
              "outputs": [{"name": "anomaly_score", "parameters": {"binary_data": True}},
                          {"name": "reconstruction", "parameters": {"binary_data": True}},
                          {"name": "is_anomaly"}]}
    body, headers = binary_request(header, x784.astype("<f4").tobytes())
    r = client.post(URL, content=body, headers=headers)
    assert r.status_code == 200, r.text
    head, blobs_ = split_binary(r)
    np.testing.assert_array_equal(np.frombuffer(blobs_["anomaly_score"], "<f8"),
                                  detector.detect(X).scores)
    recon = np.frombuffer(blobs_["reconstruction"], "<f4")
    assert recon.size == 4 * 784 and head["outputs"][1]["shape"] == [4, 784]
    assert "data" in head["outputs"][2]  # not asked for binary: JSON


def test_binary_data_output_parameter_and_gzip(client):
    x = np.rint(X * 255).astype(np.uint8)
    header = {"parameters": {"binary_data_output": True},
              "inputs": [{"name": "images", "datatype": "UINT8", "shape": [4, 28, 28],
                          "parameters": {"binary_data_size": x.nbytes}}]}
    body, headers = binary_request(header, x.tobytes())
    r = client.post(URL, content=gzip.compress(body), headers={**headers,
                                                                "content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    _, blobs_ = split_binary(r)
    assert set(blobs_) == {"anomaly_score", "is_anomaly"}
    assert np.frombuffer(blobs_["is_anomaly"], bool).shape == (4,)


def test_operating_point_parameter_and_versions(client, detector):
    r = client.post("/v2/models/blobs/versions/v1/infer", json={
        "inputs": [tensor(X)], "parameters": {"operating_point": "fpr@10%"},
        "outputs": [{"name": "is_anomaly"}]})
    body = r.json()
    assert body["model_version"] == "v1" and body["parameters"]["operating_point"] == "fpr@10%"
    thr = detector.calibration_.operating_points["fpr@10%"].threshold
    assert body["outputs"][0]["data"] == (detector.detect(X).scores > thr).tolist()


def test_float_scale_rule_is_per_image(client):
    img = blobs(1, seed=90)[0]
    x = np.stack([np.rint(img * 255) / 255, np.rint(img * 255)]).astype(np.float32)
    r = client.post(URL, json={"inputs": [tensor(x)], "outputs": [{"name": "anomaly_score"}]})
    s = r.json()["outputs"][0]["data"]
    assert s[0] == pytest.approx(s[1], rel=1e-5)  # [0, 1] and 0-255: the same image


BAD = {
    "two inputs": ({"inputs": [tensor(X), tensor(X)]}, 400),
    "wrong input name": ({"inputs": [{**tensor(X), "name": "x"}]}, 400),
    "wrong datatype": ({"inputs": [tensor(X, "INT8")]}, 400),
    "wrong shape": ({"inputs": [{**tensor(X), "shape": [4, 27, 28]}]}, 400),
    "rank 4": ({"inputs": [{**tensor(X), "shape": [4, 28, 28, 1]}]}, 400),
    "data length": ({"inputs": [{**tensor(X), "shape": [5, 28, 28]}]}, 400),
    "no data": ({"inputs": [{k: v for k, v in tensor(X).items() if k != "data"}]}, 400),
    "strings": ({"inputs": [{**tensor(X[:1]), "data": ["a"] * 784}]}, 400),
    "uint8 floats": ({"inputs": [tensor(X[:1], "UINT8")]}, 400),
    "uint8 range": ({"inputs": [{**tensor(X[:1], "UINT8"), "data": [300] * 784}]}, 400),
    "negative": ({"inputs": [{**tensor(X[:1]), "data": [-0.5] * 784}]}, 400),
    "empty batch": ({"inputs": [{**tensor(X[:1]), "shape": [0, 784], "data": []}]}, 400),
    "batch too large": ({"inputs": [tensor(np.zeros((9, 784), np.float32))]}, 400),
    "unknown output": ({"inputs": [tensor(X)], "outputs": [{"name": "latent"}]}, 400),
    "missing inputs": ({"id": "x"}, 400),
    "bad operating point": ({"inputs": [tensor(X)], "parameters": {"operating_point": "x"}},
                            400),
    "binary size mismatch": ({"inputs": [{"name": "images", "datatype": "FP32",
                                          "shape": [1, 784],
                                          "parameters": {"binary_data_size": 12}}]}, 400),
    # "false" as a string is not false: a flag must be a JSON boolean, not guessed at.
    "flag as a string": ({"inputs": [tensor(X)], "parameters": {"binary_data_output": "false"}},
                         400),
    "output flag as a number": ({"inputs": [tensor(X)],
                                 "outputs": [{"name": "anomaly_score",
                                              "parameters": {"binary_data": 0}}]}, 400),
    "binary size not int": ({"inputs": [{"name": "images", "datatype": "FP32",
                                         "shape": [1, 784],
                                         "parameters": {"binary_data_size": "big"}}]}, 400),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_use_the_v2_error_format(client, case):
    body, status = BAD[case]
    v2_error(client.post(URL, json=body), status)


def test_nan_and_malformed_bodies(client):
    data = X[:1].ravel().tolist()
    data[100] = float("nan")
    text = json.dumps({"inputs": [{**tensor(X[:1]), "data": data}]})  # Python writes NaN
    assert "finite" in v2_error(client.post(URL, content=text, headers={
        "content-type": "application/json"}), 400)
    v2_error(client.post(URL, content=b"{oops"), 400)
    v2_error(client.post(URL, content=b"[1]"), 400)
    v2_error(client.post(URL, content=b'{"inputs": []}', headers={
        "Inference-Header-Content-Length": "999"}), 400)
    v2_error(client.post(URL, content=b"not gzip", headers={"content-encoding": "gzip"}), 400)
    v2_error(client.post(URL, content=b"x", headers={"content-encoding": "br"}), 415)
    v2_error(client.post(URL, content=b"0" * 300_000), 413)
    v2_error(client.post("/v2/models/nope/infer", json={"inputs": [tensor(X)]}), 404)
    v2_error(client.post("/v2/models/blobs/versions/v9/infer", json={"inputs": [tensor(X)]}), 404)
    v2_error(client.get(URL), 405)
    assert client.post(URL, json={"inputs": [tensor(X)]}).status_code == 200


def test_only_cheap_bodies_are_parsed_on_the_event_loop():
    from service.routers.v2 import _small
    from service.scoring import INLINE_BINARY_BYTES, INLINE_BYTES

    tensor = bytes(64 * 28 * 28 * 4)  # a 64-image float32 batch after a 200-byte header
    assert _small(b"{}" * 100 + tensor, "identity", "200")
    assert _small(b"{}", "", None)
    assert not _small(b"{}" * 100 + tensor, "gzip", "200")  # may inflate to far more
    assert not _small(b" " * (INLINE_BYTES + 1), "identity", None)  # all JSON, too much
    assert not _small(b"{}" * 100 + bytes(INLINE_BYTES + INLINE_BINARY_BYTES), "identity", "200")
    assert not _small(b"{}", "identity", "twelve")  # left to the pool, which says why
