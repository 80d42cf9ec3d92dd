"""Hypothesis property tests of the service's parsers: the image decoders of service.inputs and
the V2 tensor parser. Every input either decodes to exactly the pixels the project's rule gives
or is refused with a 4xx ServiceError in the "Expected X. Received: Y" style; nothing else
ever escapes (that would be a 500)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from service import inputs  # noqa: E402
from service.errors import ServiceError, check_json_structure  # noqa: E402
from service.routers import v2  # noqa: E402
from service.settings import Settings  # noqa: E402

SHAPE = (28, 28, 1)
LIMITS = {"shape": SHAPE, "max_images": 8, "max_pixels": 256 * 256,
          "max_request_pixels": 4 * 256 * 256}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SETTINGS = Settings(max_batch_images=8, max_body_bytes=1 << 20)

u8_images = hnp.arrays(np.uint8, st.tuples(st.integers(1, 4), st.just(28), st.just(28)))
unit_images = hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.just(28), st.just(28)),
                         elements=st.floats(0, 1, width=32))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=30) | st.dictionaries(st.text(max_size=4),
                                                                       children, max_size=3),
    max_leaves=60)


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def refused(exc: ServiceError, statuses=(400, 413, 415, 422)) -> None:
    assert exc.status_code in statuses, exc.message
    assert exc.message.startswith("Expected ") and ". Received: " in exc.message, exc.message


@FAST
@given(u8_images)
def test_integer_lists_and_pngs_decode_to_the_same_pixels(x):
    want = x.astype(np.float32) / 255
    np.testing.assert_array_equal(inputs.decode_json_images(x.tolist(), **LIMITS), want)
    b64 = [base64.b64encode(png(img)).decode() for img in x]
    np.testing.assert_array_equal(inputs.decode_json_images(b64, **LIMITS), want)
    files = [(f"{i}.png", png(img)) for i, img in enumerate(x)]
    np.testing.assert_array_equal(inputs.decode_files(files, **LIMITS), want)


@FAST
@given(unit_images)
def test_unit_float_lists_are_taken_as_they_are(x):
    x[:, 0, 0] = 0.5  # at least one non-integer value: the [0, 1] scale
    np.testing.assert_array_equal(inputs.decode_json_images(x.tolist(), **LIMITS), x)


@FAST
@given(st.lists(json_values, min_size=0, max_size=3))
def test_any_json_images_decode_or_are_refused(items):
    try:
        out = inputs.decode_json_images(items, **LIMITS)
    except ServiceError as exc:
        refused(exc)
        return
    assert out.shape == (len(items), 28, 28) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@FAST
@given(st.binary(max_size=200), st.booleans())
def test_any_bytes_as_an_image_decode_or_are_refused(data, as_base64):
    try:
        if as_base64:
            inputs.decode_json_images([base64.b64encode(data).decode()], **LIMITS)
        else:
            inputs.decode_files([("x", data)], **LIMITS)
    except ServiceError as exc:
        refused(exc, (422,))


def v2_body(header: dict, blob: bytes = b"") -> tuple[bytes, str | None]:
    head = json.dumps(header).encode()
    return head + blob, (str(len(head)) if blob else None)


@FAST
@given(u8_images, st.booleans(), st.sampled_from(["UINT8", "FP32", "FP64"]), st.booleans())
def test_v2_tensors_json_and_binary_give_the_same_pixels(x, flat, datatype, binary):
    shape = [len(x), 784] if flat else list(x.shape)
    arr = x.reshape(shape)
    if datatype != "UINT8":  # floats above 1: the 0-255 scale, decided per image
        arr = arr.astype(np.float32 if datatype == "FP32" else np.float64)
    tensor = {"name": "images", "datatype": datatype, "shape": shape}
    if binary:
        raw = np.ascontiguousarray(arr, dtype={"UINT8": "u1", "FP32": "<f4",
                                               "FP64": "<f8"}[datatype]).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        body, header_len = v2_body({"inputs": [tensor]}, raw)
    else:
        tensor["data"] = arr.tolist()
        body, header_len = v2_body({"inputs": [tensor]})
    _, _, _, _, got = v2._parse(body, "", header_len, SETTINGS, SHAPE)
    want = inputs.validated(arr.reshape(len(x), 28, 28), "x")
    np.testing.assert_array_equal(got, want)


tensor_fields = st.fixed_dictionaries({
    "name": st.sampled_from(["images", "x"]) | json_values,
    "datatype": st.sampled_from(["FP32", "FP64", "UINT8", "INT8"]) | json_values,
    "shape": st.lists(st.integers(-2, 800), max_size=4) | json_values,
}, optional={"data": json_values | st.lists(st.integers(0, 300), max_size=800),
             "parameters": st.fixed_dictionaries({}, optional={
                 "binary_data_size": st.integers(-1, 4000) | json_values})})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"inputs": st.lists(tensor_fields, max_size=2)}, optional={
    "id": json_values, "parameters": st.dictionaries(
        st.sampled_from(["operating_point", "binary_data_output", "other"]), json_values),
    "outputs": st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["anomaly_score", "is_anomaly", "reconstruction", "z"])},
        optional={"parameters": st.dictionaries(st.just("binary_data"), json_values)}),
        max_size=3)}), st.binary(max_size=64))
def test_any_v2_request_parses_or_is_refused(header, blob):
    body, header_len = v2_body(header, blob)
    try:
        _, wanted, _, raw, x = v2._parse(body, "", header_len, SETTINGS, SHAPE)
    except ServiceError as exc:
        refused(exc)
        return
    assert x.shape == (raw.shape[0], 28, 28) and 1 <= len(x) <= SETTINGS.max_batch_images
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    assert all(name in v2.OUTPUTS for name, _ in wanted)


@FAST
@given(json_values)
def test_structure_scan_agrees_with_the_parser(value):
    """The pre-parse depth count equals the real nesting depth of any JSON document."""
    text = json.dumps(value).encode()

    def depth(v) -> int:
        if isinstance(v, list | dict):
            inner = v.values() if isinstance(v, dict) else v
            return 1 + max((depth(c) for c in inner), default=0)
        return 0

    d = depth(value)
    check_json_structure(text, max_depth=d, max_keys=10**6)
    if d:
        with pytest.raises(ServiceError):
            check_json_structure(text, max_depth=d - 1, max_keys=10**6)


@FAST
@given(json_values)
def test_structure_scan_counts_keys_outside_strings_only(value):
    """The key limit is the real number of object keys, whichever path the scan takes (the
    raw-byte bounds or the string-aware count)."""
    text = json.dumps(value).encode()

    def keys(v) -> int:
        if isinstance(v, dict):
            return len(v) + sum(keys(c) for c in v.values())
        return sum(keys(c) for c in v) if isinstance(v, list) else 0

    k = keys(value)
    check_json_structure(text, max_depth=10**6, max_keys=k)
    if k:
        with pytest.raises(ServiceError):
            check_json_structure(text, max_depth=10**6, max_keys=k - 1)


def test_structure_scan_sees_past_brackets_and_colons_in_strings():
    """Brackets and colons inside strings push the raw-byte counts over the limits, yet the
    body is within them: the string-aware count lets it through; a real excess is refused."""
    body = json.dumps({"images": ["[[[[{{{{::::" * 20], "note": 'a \\"[" b'}).encode()
    check_json_structure(body, max_depth=2, max_keys=2)
    with pytest.raises(ServiceError, match="at most 1 object keys"):
        check_json_structure(body, max_depth=2, max_keys=1)
    with pytest.raises(ServiceError, match="nested at most 1 levels"):
        check_json_structure(body, max_depth=1, max_keys=2)


@FAST
@given(json_values, st.sampled_from([1, 2, 3, 7, 64]))
def test_structure_scan_agrees_across_chunk_boundaries(value, chunk):
    """The scan works a chunk of the body at a time; with tiny chunks, strings, escapes and
    bracket runs cross the boundaries, and depth and keys still equal the parser's."""
    from unittest import mock

    from service import errors

    text = json.dumps({"a": value, "b:[{": '\\"[{:'}).encode()
    whole = json.loads(text)

    def depth(v) -> int:
        if isinstance(v, list | dict):
            inner = v.values() if isinstance(v, dict) else v
            return 1 + max((depth(c) for c in inner), default=0)
        return 0

    def keys(v) -> int:
        if isinstance(v, dict):
            return len(v) + sum(keys(c) for c in v.values())
        return sum(keys(c) for c in v) if isinstance(v, list) else 0

    d, k = depth(whole), keys(whole)
    with mock.patch.object(errors, "_SCAN_CHUNK", chunk):
        # The strings' brackets and colons put the raw counts over these exact limits, so the
        # chunked scan decides, not the shortcut.
        check_json_structure(text, max_depth=d, max_keys=k)
        with pytest.raises(ServiceError, match="levels deep"):
            check_json_structure(text, max_depth=d - 1, max_keys=k)
        with pytest.raises(ServiceError, match="object keys"):
            check_json_structure(text, max_depth=d, max_keys=k - 1)


# -- the byte-level reader of all-integer JSON batches ----------------------------------------

TINY = (2, 3, 1)
_MUTATIONS = b' \n-0179.e"\\[],{}:'


def _general(body: bytes, shape):
    """What the route answered before the byte-level reader: the whole body parsed."""
    from service.routers import models

    req, options = models._parse_json(body, SETTINGS, {})
    return models._decode_json(req, SETTINGS, shape), options


def _outcome(fn):
    try:
        return fn()
    except ServiceError as exc:
        return ("refused", exc.status_code, exc.message)


def _batch_body(x: np.ndarray, options: dict, first: bool, indent: bool) -> bytes:
    body = {"images": x.tolist(), **options} if first else {**options, "images": x.tolist()}
    return json.dumps(body, indent=1 if indent else None).encode()


@FAST
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 3), st.just(2), st.just(3))),
       st.fixed_dictionaries({}, optional={"operating_point": st.sampled_from(["fpr@1%", "x"]),
                                           "return_reconstruction": st.booleans()}),
       st.booleans(), st.booleans(), st.lists(st.tuples(st.integers(0, 10_000),
                                                        st.sampled_from(_MUTATIONS),
                                                        st.booleans()), max_size=3))
def test_integer_batch_reader_answers_as_the_parser_does(x, options, first, indent, edits):
    """Any body, valid or broken by a few edits: where the byte-level reader takes it, the
    pixels and options are those of parsing the whole body, and it never takes a body the
    parser refuses."""
    from service.routers import models

    body = bytearray(_batch_body(x, options, first, indent))
    for pos, char, insert in edits:
        pos %= len(body) + 1
        if insert:
            body[pos:pos] = bytes([char])
        elif pos < len(body):
            del body[pos]
    body = bytes(body)
    want = _outcome(lambda: _general(body, TINY))
    got = _outcome(lambda: models._parse_and_decode_json(body, SETTINGS, {}, TINY))
    if isinstance(want[0], str):
        assert got == want
        return
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("indent", [True, False])
def test_integer_batch_reader_takes_the_common_bodies(first, indent):
    """Not vacuous: the bodies clients send (json.dumps, any whitespace, options before or
    after) are read from their bytes, to the same pixels."""
    x = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    body = _batch_body(x, {"operating_point": "fpr@1%"}, first, indent)
    fast = inputs.integer_json_batch(body, SHAPE, max_images=8, max_depth=32)
    assert fast is not None
    np.testing.assert_array_equal(fast[0], x)
    assert json.loads(fast[1]) == {"images": [], "operating_point": "fpr@1%"}


@pytest.mark.parametrize("body", [
    b'{"images": [[[1, 2, 3], [4, 5, 6]]], "x": {"images": 1}}',  # the key twice
    b'{"meta": {"images": [[[1, 2, 3], [4, 5, 6]]]}}',  # not the top-level key
    b'{"a": "{", "images": [[[1, 2, 3], [4, 5, 6]]]}',  # a brace in a string before it
    b'{"images": [[[1, 2, 3], [4, 5, 256]]]}',  # beyond 255
    b'{"images": [[[1, 2, 3], [4, 5, 06]]]}',  # a leading zero: not JSON
    b'{"images": [[[1, 2, 3], [4, 5 6]]]}',  # a number split by a space
    b'{"images": [[[1, 2, 3], [4, 5, 6.0]]]}',  # a float: the per-image scale rule
    b'{"images": [[[1, 2, 3], [4, 5]]]}',  # the wrong shape
    b'{"images": [[[1, 2, 3], [4, 5, 6]]], "s": "\\u0041"}',  # an escape
    b'{"images": [[1[, 2, 3], [4, 5, 6]]]}',  # a number before an opening bracket
    b'{"images": [[[1, 2, 3], [4, 5, ]6]]}',  # a number after a closing bracket
    b'{"images": [[[1, 2, 3], [4, 5, 1000]]]}',  # four digits
    b'{"images": [[[1, 2], [3, 4, 5, 6]]]}',  # ragged, with the right count of numbers
    b'{"images": [[1, 2, 3, 4, 5, 6]]}',  # flat images, with the right count
    b'{"images": [[[1, 2, 3], [4, 5, -6]]]}',  # negative
    b'{"images": [[[1, 2, 3], [4, 5, 1e2]]]}',  # an exponent: a float
    b'{"images": [[[1, 2, 3], [4, 5, 99999999999999999999]]]}',  # beyond int64
    b'{"images": [[[1, 2, 3], [4, 5, true]]]}',  # a boolean
    b'{"images": [[[1, 2, 3], [4, 5, null]]]}',
    b'{"images": [[[1, 2, 3], [4, 5, 6]' + b' ' * 2000 + b']]}',  # longer than 8 images can be
    b'{"images": [[[1, 2, 3], [4, 5, 6]]], [1]}',  # more after the array
    b'{"images": [[[1, 2, 3], [4, 5, 6]], "x": 1}',  # not closed
    b'{"images": []}',
])
def test_integer_batch_reader_leaves_the_rest_to_the_parser(body):
    assert inputs.integer_json_batch(body, TINY, max_images=8, max_depth=32) is None


def test_integer_batch_reader_leaves_too_many_images_to_the_parser():
    body = _batch_body(np.zeros((9, 2, 3), np.uint8), {}, True, False)
    assert inputs.integer_json_batch(body, TINY, max_images=8, max_depth=32) is None
    assert inputs.integer_json_batch(body, TINY, max_images=9, max_depth=32) is not None


def test_integer_batch_reader_keeps_no_large_parser():
    """A parser keeps the buffers of the largest document it read: only small spans share the
    thread's parser, so one huge body does not pin its memory in every CPU-pool thread."""
    small = inputs._json_parser(1 << 20)
    assert inputs._json_parser(1 << 20) is small
    big = inputs._json_parser(inputs._REUSE_PARSER_BYTES + 1)
    assert big is not small and inputs._json_parser(inputs._REUSE_PARSER_BYTES + 1) is not big
    x = np.random.default_rng(1).integers(0, 256, (2, 700, 700), dtype=np.uint8)
    body = _batch_body(x, {}, True, False)
    assert len(body) > inputs._REUSE_PARSER_BYTES  # read by a parser of its own
    np.testing.assert_array_equal(
        inputs.integer_json_batch(body, (700, 700, 1), max_images=8, max_depth=32)[0], x)
