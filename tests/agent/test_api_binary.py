"""The local API's binary tensor framing (application/x-edgesdk-tensors): what it carries, that npz
and JSON keep working beside it, and hostile bodies: each a one-line 400 that kills no server
thread. The decoder is fuzzed with hypothesis (arbitrary bytes and mutations of valid bodies)."""

from __future__ import annotations

import http.client
import json
import struct
import threading
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import agent.api
from agent.api import ApiLimits, ApiServer
from agent.client import ApiError, EdgeClient
from agent.model_host import ActiveModel, ModelHost
from agent.telemetry import LatencyRecorder, ProcessStats
from agent.tensor_frame import DTYPE_CODES, TENSORS_TYPE, TensorFrameError, decode_tensors, encode_tensors
from edgesdk import runtime
from edgesdk.errors import ConfigError
from tests.agent.test_api_attacks import (X, affine, affine_model, api_factory, host, raw_request,  # noqa: F401
                                          serves_normally, serving)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def post(api: ApiServer, body: bytes, ctype: str = TENSORS_TYPE, path: str = "/v1/infer") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


# -- what it carries --------------------------------------------------------------------------------

def test_infer_over_the_binary_framing_matches_npz_and_json(affine, api_factory) -> None:  # noqa: ANN001
    api = api_factory()
    binary = EdgeClient(api.url)
    npz = EdgeClient(api.url, wire="application/x-npz")

    got = binary.infer({"x": X})

    assert binary.wire == TENSORS_TYPE
    assert got["y"].dtype == np.float32 and np.array_equal(got["y"], X * 2 + 1)
    assert np.array_equal(npz.infer({"x": X})["y"], got["y"])
    assert binary.infer_json({"x": X.tolist()})["outputs"]["y"] == got["y"].tolist()
    status, ctype, body = post(api, encode_tensors({"x": X}))
    assert (status, ctype) == (200, TENSORS_TYPE)
    assert np.array_equal(decode_tensors(body)["y"], X * 2 + 1)
    assert api.requests() == {"ok": 4, "error": 0}


def test_answers_carry_the_release_and_latency_headers(affine, api_factory) -> None:  # noqa: ANN001
    api = api_factory()
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    conn.request("POST", "/v1/models/m/infer", body=encode_tensors({"x": X}), headers={"Content-Type": TENSORS_TYPE})
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    assert response.getheader("X-Edge-Model") == "m@1.0.0" and float(response.getheader("X-Edge-Latency-Ms")) >= 0


def test_client_falls_back_to_npz_on_an_agent_without_the_framing(  # noqa: ANN001
        affine, api_factory, monkeypatch) -> None:
    # An agent older than the framing answers 415 to its content type; the client switches to npz.
    monkeypatch.setattr(agent.api, "INFER_TYPES", tuple(t for t in agent.api.INFER_TYPES if t != TENSORS_TYPE))
    api = api_factory()
    client = EdgeClient(api.url)

    assert np.array_equal(client.infer({"x": X})["y"], X * 2 + 1)
    assert client.wire == "application/x-npz"
    assert np.array_equal(client.infer({"x": X})["y"], X * 2 + 1)
    assert api.requests() == {"ok": 2, "error": 1}  # the one 415


def test_client_refuses_an_unknown_wire() -> None:
    with pytest.raises(ConfigError, match="wire must be"):
        EdgeClient(wire="application/x-protobuf")


class _Fixed:
    """A session that answers fixed outputs (what a model with string outputs returns)."""

    input_names, output_names = ["x"], ["label"]

    def __init__(self, outputs: Mapping[str, np.ndarray]) -> None:
        self.outputs = outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(self.outputs)


def test_an_output_the_framing_cannot_carry_is_a_one_line_406(host: ModelHost, api_factory) -> None:  # noqa: ANN001
    labels = _Fixed({"label": np.array(["cat", "dog"], dtype=object)})
    host.swap("labels", ActiveModel(session=labels, package_id="ef" * 32, name="labels",  # type: ignore[arg-type]
                                    version="1", variant="v", provider="CPUExecutionProvider", runtime="onnxruntime"))
    api = api_factory()

    with pytest.raises(ApiError) as err:
        EdgeClient(api.url).infer({"x": X})

    assert err.value.status == 406 and "\n" not in str(err.value) and "use JSON" in str(err.value)
    assert EdgeClient(api.url).infer_json({"x": X.tolist()})["outputs"]["label"] == ["cat", "dog"]


def test_client_reports_an_input_the_framing_cannot_carry_without_sending_it(  # noqa: ANN001
        affine, api_factory) -> None:
    api = api_factory()
    with pytest.raises(ApiError, match="cannot carry"):
        EdgeClient(api.url).infer({"x": np.array(["a"])})
    assert api.requests() == {"ok": 0, "error": 0}


# -- the codec --------------------------------------------------------------------------------------

def test_layout_is_the_documented_one() -> None:
    body = encode_tensors({"x": np.array([[1.5, -2.0]], dtype=np.float32)})
    expected = (b"EDT1" + struct.pack("<I", 1) + struct.pack("<H", 1) + b"x" + struct.pack("<BB", 1, 2)
                + struct.pack("<2Q", 1, 2) + bytes(3)  # 8 + 3 + 2 + 16 = 29 bytes, padded to 32
                + struct.pack("<2f", 1.5, -2.0))
    assert body == expected


def test_decoded_arrays_are_views_of_the_body_and_aligned() -> None:
    body = bytearray(encode_tensors({"a": np.arange(3, dtype=np.int8), "b": np.arange(5, dtype=np.float64)}))
    out = decode_tensors(body)
    assert all(not arr.flags.owndata and arr.ctypes.data % 8 == np.frombuffer(body, np.uint8).ctypes.data % 8
               for arr in out.values())
    assert out["b"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


DTYPES = st.sampled_from(sorted({d.newbyteorder("=") for d in DTYPE_CODES.values()}, key=str))
TENSORS = st.dictionaries(
    st.text(min_size=1, max_size=20),
    DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))),
    max_size=5)


@FUZZ
@given(TENSORS)
def test_every_supported_dtype_and_shape_round_trips(tensors: dict[str, np.ndarray]) -> None:
    out = decode_tensors(encode_tensors(tensors))
    assert list(out) == list(tensors)
    for name, arr in tensors.items():
        assert out[name].dtype == arr.dtype and out[name].shape == arr.shape
        assert np.array_equal(out[name], arr, equal_nan=arr.dtype.kind == "f")


def test_big_endian_and_strided_inputs_are_sent_as_little_endian_c_order() -> None:
    arr = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2]
    out = decode_tensors(encode_tensors({"x": arr}))["x"]
    assert out.dtype == np.dtype("<i4") and out.tolist() == arr.tolist()


def _must_parse_or_refuse(data: bytes) -> None:
    try:
        out = decode_tensors(data)
    except TensorFrameError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300
        return
    for arr in out.values():  # whatever parses is usable: it encodes again to the same bytes
        assert isinstance(arr, np.ndarray)
    assert decode_tensors(encode_tensors(out)).keys() == out.keys()


@FUZZ
@given(st.binary(max_size=256))
@example(b"")
@example(b"EDT1")
@example(b"EDT1" + struct.pack("<I", 0xFFFFFFFF))
def test_arbitrary_bytes_decode_or_raise_tensor_frame_error(data: bytes) -> None:
    _must_parse_or_refuse(data)


VALID = encode_tensors({"x": np.arange(6, dtype=np.float32).reshape(2, 3), "flag": np.array([True, False]),
                        "ids": np.arange(3, dtype=np.int64)})


@FUZZ
@given(st.data())
def test_mutated_valid_bodies_decode_or_raise_tensor_frame_error(data: st.DataObject) -> None:
    body = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "set-u64"]))
        at = data.draw(st.integers(0, max(0, len(body) - 1)))
        if kind == "flip":
            body[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del body[at:at + data.draw(st.integers(1, 16))]
        elif kind == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:  # a count, length or dim replaced by an extreme value
            body[at:at + 8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1])))
    _must_parse_or_refuse(bytes(body))


# -- hostile bodies over HTTP -----------------------------------------------------------------------

def _tensor(name: bytes, code: int, dims: tuple[int, ...], data: bytes, pad: bytes | None = None) -> bytes:
    """One tensor record whose header starts at an offset of 8 (right after the body header)."""
    head = (struct.pack("<H", len(name)) + name + struct.pack("<BB", code, len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims))
    return head + (bytes(-(8 + len(head)) % 8) if pad is None else pad) + data


def _body(*tensors: bytes, count: int | None = None) -> bytes:
    return b"EDT1" + struct.pack("<I", len(tensors) if count is None else count) + b"".join(tensors)


GOOD = _tensor(b"x", 1, (2, 4), X.tobytes())
HOSTILE = {
    "empty": b"",
    "bad-magic": b"EDT2" + GOOD[4:],
    "npz-sent-as-tensors": b"PK\x03\x04" + bytes(40),
    "count-past-the-body": _body(GOOD, count=2),
    "count-huge": _body(GOOD, count=2**32 - 1),
    "name-empty": _body(_tensor(b"", 1, (2, 4), X.tobytes())),
    "name-past-the-body": b"EDT1" + struct.pack("<IH", 1, 60000) + b"x",
    "name-not-utf8": _body(_tensor(b"\xff\xfe", 1, (2, 4), X.tobytes())),
    "name-twice": _body(GOOD, GOOD),
    "dtype-string": _body(_tensor(b"x", 8, (2, 4), X.tobytes())),
    "dtype-unknown": _body(_tensor(b"x", 200, (2, 4), X.tobytes())),
    "rank-33": _body(_tensor(b"x", 1, (1,) * 33, X.tobytes())),
    "dims-past-the-body": _body(_tensor(b"x", 1, (2, 4000), X.tobytes())),
    "dims-overflow-u64": _body(_tensor(b"x", 1, (2**64 - 1, 2**64 - 1), X.tobytes())),
    "zero-dim-beside-a-huge-one": _body(_tensor(b"x", 1, (0, 2**63 + 5), b"")),
    "padding-not-zero": _body(_tensor(b"x", 1, (2, 4), X.tobytes(), pad=b"\x01" * 3)),
    "padding-missing": _body(_tensor(b"x", 1, (2, 4), X.tobytes(), pad=b"")),
    "trailing-bytes": _body(GOOD) + b"\x00",
    "truncated-data": _body(GOOD)[:-1],
    "bool-not-0-or-1": _body(_tensor(b"x", 9, (8,), bytes([0, 1, 2, 0, 1, 0, 1, 0]))),
}


@pytest.mark.parametrize("body", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_tensor_bodies_are_a_one_line_400_and_kill_no_server_thread(  # noqa: ANN001
        affine, api_factory, body) -> None:
    api = api_factory(limits=ApiLimits(workers=2))
    threads_before = threading.active_count()

    status, ctype, answer = post(api, body)

    error = json.loads(answer)["error"]
    assert (status, ctype) == (400, "application/json"), error
    assert error.startswith(f"body is not valid {TENSORS_TYPE}: ") and "\n" not in error and len(error) < 400
    assert threading.active_count() == threads_before
    assert serves_normally(api)
    assert api.requests() == {"ok": 1, "error": 1}


def test_a_well_framed_body_of_the_wrong_shape_is_the_models_400(affine, api_factory) -> None:  # noqa: ANN001
    api = api_factory()
    status, _, answer = post(api, encode_tensors({"x": np.zeros((2, 5), np.float32)}))
    assert status == 400 and "shape" in json.loads(answer)["error"]


def test_a_tensor_body_claiming_more_than_max_body_bytes_is_refused_unread(affine, api_factory) -> None:  # noqa: ANN001
    api = api_factory(limits=ApiLimits(max_body_bytes=1024, max_buffered_bytes=1024))
    head = (f"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nContent-Type: {TENSORS_TYPE}\r\n"
            f"Content-Length: {64 * 1024 * 1024}\r\n\r\n").encode()
    status, _, answer = raw_request(api.port, head)
    assert status == 413 and "limit is 1024" in json.loads(answer)["error"]
    assert serves_normally(api)


@FUZZ
@given(st.binary(max_size=96))
def test_arbitrary_tensor_bodies_over_http_get_a_4xx_and_the_server_stays_up(api: ApiServer, data: bytes) -> None:
    status, _, answer = post(api, b"EDT1" + data)
    assert status in (200, 400), (status, answer[:200])
    if status == 400:
        assert "\n" not in json.loads(answer)["error"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """One server for the HTTP fuzz (hypothesis runs the test many times on one fixture value)."""
    tmp = tmp_path_factory.mktemp("binary-fuzz")
    model_host = ModelHost(LatencyRecorder(tmp / "state.json", probe=lambda: ProcessStats(1.0, 50.0)))
    active = serving(runtime.open_session(affine_model(tmp / "affine.onnx"), "onnxruntime", "CPUExecutionProvider"))
    model_host.swap(active.name, active)
    server = ApiServer("127.0.0.1", 0, model_host, limits=ApiLimits(workers=2))
    server.start()
    yield server
    assert serves_normally(server)
    server.stop()
