"""Every bad input is a 4xx JSON error naming what was expected and what arrived; never a 500.

The shared ``client`` runs with max_batch_images=8, max_body_bytes=256 KiB and
max_image_pixels=256*256 so the limits are cheap to hit.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import blobs

GOOD = np.rint(blobs(1)[0] * 255).astype(int).tolist()
URL = "/v1/models/blobs/score"


def check_error(resp, status: int, code: str | None = None) -> dict:
    """The one error format, with the message style; returns the error object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"code", "message"}
    if code is not None:
        assert err["code"] == code, err
    assert err["message"].startswith("Expected ") and ". Received: " in err["message"], err
    assert "Traceback" not in resp.text
    return err


def image_with(value, row: int = 3, col: int = 4):
    img = [list(r) for r in GOOD]
    img[row][col] = value
    return img


def png_bytes(shape=(28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


BAD_JSON_BODIES = {
    "not a list": ({"images": "abc"}, "validation_error"),
    "missing images": ({"operating_point": "fpr@1%"}, "validation_error"),
    "extra field": ({"images": [GOOD], "colour": "red"}, "validation_error"),
    "bad bool": ({"images": [GOOD], "return_reconstruction": "maybe"}, "validation_error"),
    "bad image_format": ({"images": [GOOD], "image_format": "gif"}, "validation_error"),
    "empty batch": ({"images": []}, "empty_batch"),
    "batch too large": ({"images": [GOOD] * 9}, "batch_too_large"),
    "flat 784": ({"images": [[p for row in GOOD for p in row]]}, "invalid_shape"),
    "depth 3": ({"images": [[GOOD]]}, "invalid_shape"),
    "27 rows": ({"images": [GOOD[:27]]}, "invalid_shape"),
    "ragged rows": ({"images": [[*GOOD[:27], GOOD[27][:5]]]}, "invalid_shape"),
    "scalar image": ({"images": [7]}, "invalid_image"),
    "object image": ({"images": [{"a": 1}]}, "invalid_image"),
    "null pixel": ({"images": [image_with(None)]}, "invalid_dtype"),
    "string pixel": ({"images": [image_with("x")]}, "invalid_dtype"),
    "bool image": ({"images": [[[True] * 28] * 28]}, "invalid_dtype"),
    # orjson reads an integer beyond 64 bits as a float: out of range rather than a bad dtype.
    "huge int": ({"images": [image_with(10**30)]}, "out_of_range"),
    "negative": ({"images": [image_with(-1)]}, "out_of_range"),
    "above 255": ({"images": [image_with(256)]}, "out_of_range"),
    "float above 255": ({"images": [image_with(255.5)]}, "out_of_range"),
    "not base64": ({"images": ["not base64!!"]}, "invalid_base64"),
    "base64 of text": ({"images": [base64.b64encode(b"hello world").decode()]},
                       "invalid_image"),
    "too many pixels": ({"images": [base64.b64encode(png_bytes((300, 300))).decode()]},
                        "image_too_large"),
    "unknown operating point": ({"images": [GOOD], "operating_point": "fpr@50%"},
                                "unknown_operating_point"),
}


@pytest.mark.parametrize("case", list(BAD_JSON_BODIES))
def test_bad_json_bodies(client, case):
    body, code = BAD_JSON_BODIES[case]
    check_error(client.post(URL, json=body), 422, code)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_pixels(client, literal):
    text = json.dumps({"images": [image_with(0.5)]}).replace("0.5", literal, 1)
    err = check_error(client.post(URL, content=text,
                                  headers={"content-type": "application/json"}), 422)
    assert err["code"] in ("non_finite", "out_of_range")
    assert "images[0]" in err["message"]


@pytest.mark.parametrize("body", [b"{", b"", b"\xff\xfe\x00"])
def test_malformed_json(client, body):
    check_error(client.post(URL, content=body, headers={"content-type": "application/json"}),
                400, "invalid_json")


def test_deep_nesting_is_refused_before_parsing_naming_the_limit(client):
    err = check_error(client.post(URL, content=b"[" * 100_000,
                                  headers={"content-type": "application/json"}),
                      400, "json_too_complex")
    assert "at most 32 levels" in err["message"] and "ANOMALY_MAX_JSON_DEPTH" in err["message"]


def test_json_that_is_not_an_object(client):
    check_error(client.post(URL, json=[GOOD]), 422, "validation_error")


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/xml"])
def test_wrong_content_type(client, ctype):
    headers = {"content-type": ctype} if ctype else {}
    check_error(client.post(URL, content=json.dumps({"images": [GOOD]}), headers=headers),
                415, "unsupported_media_type")


def test_body_above_the_cap_is_413(client):
    big = b'{"images": [' + b"0," * 200_000 + b"0]}"
    check_error(client.post(URL, content=big, headers={"content-type": "application/json"}),
                413, "payload_too_large")


def test_chunked_body_above_the_cap_is_413(client):
    def chunks():
        yield b'{"images": ['
        for _ in range(100):
            yield b"0," * 2000

    r = client.post(URL, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # really chunked
    check_error(r, 413, "payload_too_large")


def test_bad_multipart(client):
    r = client.post(URL, content=b"--x\r\nnonsense", headers={
        "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code in (400, 422), r.text
    check_error(r, r.status_code)
    files = [("images", ("a.txt", b"not an image", "text/plain"))]
    check_error(client.post(URL, files=files), 422, "invalid_image")
    files = [("picture", ("a.png", png_bytes(), "image/png"))]
    check_error(client.post(URL, files=files), 422, "validation_error")
    check_error(client.post(URL, files=[("images", ("a.png", png_bytes(), "image/png"))],
                            data={"colour": "red"}), 422, "validation_error")
    check_error(client.post(URL, data={"operating_point": "fpr@1%"},
                            files=[("other", ("a.png", png_bytes(), "image/png"))]), 422)
    check_error(client.post(URL, files=[("images", (f"{i}.png", png_bytes(), "image/png"))
                                        for i in range(9)]), 422, "batch_too_large")


def test_bad_query_parameter(client):
    check_error(client.post(URL + "?return_reconstruction=maybe", json={"images": [GOOD]}),
                422, "validation_error")


def test_unknown_model_version_route_and_method(client):
    check_error(client.post("/v1/models/nope/score", json={"images": [GOOD]}), 404,
                "model_not_found")
    check_error(client.get("/v1/models/nope"), 404, "model_not_found")
    check_error(client.post("/v1/models/blobs/versions/v9/score", json={"images": [GOOD]}),
                404, "version_not_found")
    check_error(client.get("/nowhere"), 404, "not_found")
    check_error(client.get(URL), 405, "method_not_allowed")
    check_error(client.delete("/v1/models/blobs"), 405, "method_not_allowed")


def test_server_keeps_serving_after_bad_input(client):
    for body, _ in BAD_JSON_BODIES.values():
        assert client.post(URL, json=body).status_code < 500
    r = client.post(URL, json={"images": [GOOD]})
    assert r.status_code == 200 and len(r.json()["results"]) == 1
