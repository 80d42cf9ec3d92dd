"""Schemathesis hooks for tests/service/test_fuzz.py (loaded with SCHEMATHESIS_HOOKS)."""

from __future__ import annotations

import schemathesis

#: 4xx answers to schema-valid requests that are correct: the document cannot express them.
#: v1: the bytes of a base64 string are not an image (or too big once decoded).
INEXPRESSIBLE_V1 = {"invalid_base64", "invalid_image", "image_too_large", "too_many_pixels",
                    # a feedback image's pixels against the model's shape, a time's format
                    "invalid_feedback"}
#: V2 errors carry no code; these are the messages of the V2 checks JSON Schema cannot do:
#: the data's length against the shape, ragged nesting, integers for UINT8 only.
INEXPRESSIBLE_V2 = ("values for shape", "bytes of binary", "Received: ragged nesting",
                    "integers in the data of a UINT8 input", "an operating point of")


@schemathesis.check
def schema_valid_not_rejected(ctx, response, case):
    """Positive cases (valid by the document) get no 4xx other than the inexpressible ones."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status >= 500 or status in (401, 403, 404):
        return None  # 5xx is not_a_server_error's; 401/403/404: keys and names, not shapes
    try:
        err = response.json()["error"]
    except Exception:
        err = None
    if isinstance(err, dict) and err.get("code") in INEXPRESSIBLE_V1:
        return None
    if isinstance(err, dict) and err.get("code") == "unknown_operating_point":
        return None  # operating points are model data, listed by GET /v1/models/{name}
    if isinstance(err, str) and any(s in err for s in INEXPRESSIBLE_V2):
        return None
    raise AssertionError(f"schema-valid request rejected with {status}: {response.text[:300]}")
