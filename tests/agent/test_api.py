"""ModelHost (validation, hot swap) and the local HTTP API end to end with a real ORT session."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from agent.api import ApiLimits, ApiServer, is_loopback, parse_address
from agent.client import ApiError, ApiUnreachableError, EdgeClient
from agent.model_host import (
    ActiveModel, InferenceFailedError, InvalidInputError, ModelHost, NoModelError,
)
from agent.telemetry import LatencyRecorder, ProcessStats
from edgesdk.errors import ConfigError, EdgeError


def affine_model(path: Path, scale: float, bias: float) -> Path:
    """y = x * scale + bias on a float32 [N, 4] input: the smallest real model with an answer to check."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["t"]), helper.make_node("Add", ["t", "bias"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("bias", TensorProto.FLOAT, [], [bias])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


class OrtSession:
    """The `SessionLike` shape over a plain InferenceSession (what edgesdk.runtime.Session offers)."""

    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self._sess.run(None, dict(feeds))))


def active(session: object, variant: str = "onnx-fp32") -> ActiveModel:
    return ActiveModel(session=session, package_id="ab" * 32, name="affine", version="1.0.0",  # type: ignore[arg-type]
                       variant=variant, provider="CPUExecutionProvider", runtime="onnxruntime",
                       inputs=[{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
                       outputs=[{"name": "y", "dtype": "float32", "shape": ["N", 4]}])


@pytest.fixture
def host(tmp_path: Path) -> ModelHost:
    recorder = LatencyRecorder(tmp_path / "state.json", probe=lambda: ProcessStats(1.0, 50.0))
    return ModelHost(recorder)


@pytest.fixture
def double_plus_one(tmp_path: Path) -> ActiveModel:
    return active(OrtSession(affine_model(tmp_path / "m2.onnx", 2.0, 1.0)))


@pytest.fixture
def server(host: ModelHost, double_plus_one: ActiveModel) -> Iterator[ApiServer]:
    host.swap("affine", double_plus_one)
    api = ApiServer("127.0.0.1", 0, host, status_fn=lambda: {"device_id": "dev-1", "model": "shadowed"},
                    limits=ApiLimits(max_body_bytes=4096))
    api.start()
    yield api
    api.stop()


X = np.arange(8, dtype=np.float32).reshape(2, 4)


# -- ModelHost -----------------------------------------------------------------------------------

@pytest.mark.parametrize("feeds, message", [
    ({"z": X}, "unknown input 'z'"),
    ({}, "missing input 'x'"),
    ({"x": X[0]}, "rank 1"),
    ({"x": np.zeros((2, 5), np.float32)}, "axis 1"),
    ({"x": [[1, 2, 3, 4], [1, 2]]}, "not a rectangular array"),
    ({"x": np.array([["a"] * 4])}, "not numeric"),
])
def test_feeds_that_do_not_fit_the_model_are_refused_in_one_line(host, double_plus_one, feeds, message) -> None:
    host.swap("affine", double_plus_one)
    with pytest.raises(InvalidInputError, match=message) as err:
        host.infer(feeds)
    assert "\n" not in str(err.value)
    [window] = host.recorder.roll()
    assert window.extra["rejected"] == 1 and window.errors == 0 and window.model == "affine"


def test_integer_and_float64_feeds_are_cast_to_the_models_dtype(host, double_plus_one) -> None:
    host.swap("affine", double_plus_one)
    out = host.infer({"x": [[1, 2, 3, 4]]})["y"]
    assert out.dtype == np.float32 and out.tolist() == [[3, 5, 7, 9]]


def test_infer_without_an_active_model_raises_no_model_error(host) -> None:
    with pytest.raises(NoModelError, match="no model is active"):
        host.infer({"x": X})


def test_runtime_failure_is_a_model_error_not_a_rejection(host) -> None:
    class Exploding:
        input_names, output_names = ["x"], ["y"]

        def run(self, feeds):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION :\n  kernel failed")

    host.swap("affine", active(Exploding()))
    with pytest.raises(InferenceFailedError, match="kernel failed") as err:
        host.infer({"x": X})
    assert "\n" not in str(err.value)
    [window] = host.recorder.roll()
    assert (window.errors, window.extra["rejected"]) == (1, 0)


def test_swap_while_many_threads_infer_loses_no_request_and_new_requests_see_new_model(
        tmp_path, host, double_plus_one) -> None:
    times_three = active(OrtSession(affine_model(tmp_path / "m3.onnx", 3.0, 0.0)), variant="onnx-int8")
    host.swap("affine", double_plus_one)
    stop, swapped = threading.Event(), threading.Event()
    errors: list[Exception] = []
    answers: list[tuple[bool, float]] = []  # (started after swap returned, y)
    twos = np.full((1, 4), 2.0, np.float32)  # old model: 5.0, new model: 6.0

    def client() -> None:
        while not stop.is_set():
            after = swapped.is_set()
            try:
                answers.append((after, float(host.infer({"x": twos})["y"][0, 0])))
            except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    while len(answers) < 300:
        threading.Event().wait(0.001)
    old = host.swap("affine", times_three)
    swapped.set()
    seen = len(answers)
    while len(answers) < seen + 300:
        threading.Event().wait(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert old is double_plus_one
    assert {y for after, y in answers if after} == {6.0}
    assert {y for after, y in answers if not after} <= {5.0, 6.0} and (False, 5.0) in answers
    assert host.drain(old, timeout_s=1.0) is True


def test_request_in_flight_on_the_old_model_finishes_on_it_and_drain_waits_for_it(host) -> None:
    entered, release = threading.Event(), threading.Event()

    class Blocking:
        input_names, output_names = ["x"], ["y"]

        def __init__(self, value: float) -> None:
            self.value = value

        def run(self, feeds):
            if self.value == 1.0:
                entered.set()
                release.wait(5)
            return {"y": np.full((1, 4), self.value, np.float32)}

    old_model, new_model = active(Blocking(1.0)), active(Blocking(2.0))
    host.swap("affine", old_model)
    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(float(host.infer({"x": X[:1]})["y"][0, 0])))
    worker.start()
    assert entered.wait(5)
    assert host.swap("affine", new_model) is old_model
    assert float(host.infer({"x": X[:1]})["y"][0, 0]) == 2.0  # swap did not wait for the old request
    assert host.in_flight(old_model) == 1
    assert host.drain(old_model, timeout_s=0.05) is False
    release.set()
    started = time.monotonic()
    assert host.drain(old_model, timeout_s=5) is True
    assert time.monotonic() - started < 2.0  # woken by the request finishing, not by the timeout
    worker.join()
    assert result == [1.0]


# -- HTTP API ------------------------------------------------------------------------------------

def test_npz_inference_round_trip_through_the_client(server) -> None:
    out = EdgeClient(server.url).infer({"x": X})
    assert set(out) == {"y"} and np.array_equal(out["y"], X * 2 + 1)


def test_json_inference_returns_outputs_and_latency(server) -> None:
    doc = EdgeClient(server.url).infer_json({"x": [[0, 1, 2, 3]]})
    assert doc["outputs"] == {"y": [[1.0, 3.0, 5.0, 7.0]]}
    assert doc["latency_ms"] >= 0


def test_bad_input_name_is_a_400_with_the_servers_one_line_message(server) -> None:
    with pytest.raises(ApiError) as err:
        EdgeClient(server.url).infer({"image": X})
    assert err.value.status == 400 and "unknown input 'image'" in str(err.value)
    assert isinstance(err.value, EdgeError) and "\n" not in str(err.value)


def test_body_over_the_limit_is_a_413_and_the_connection_stays_usable(server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("POST", "/v1/infer", body=b"\0" * 5000, headers={"Content-Type": "application/x-npz"})
    response = conn.getresponse()
    assert response.status == 413 and "limit is 4096" in json.loads(response.read())["error"]
    assert response.getheader("Connection") != "close"
    conn.request("GET", "/v1/status")  # the refused body was drained, not left in the stream
    assert conn.getresponse().status == 200
    conn.close()


def test_npz_that_inflates_past_the_limit_is_a_413(server, tmp_path) -> None:
    import io
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((1000, 4), np.float32))  # 16 KB of zeros, compresses to ~100 B
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("POST", "/v1/infer", body=buf.getvalue(), headers={"Content-Type": "application/x-npz"})
    response = conn.getresponse()
    assert response.status == 413 and "decodes to" in json.loads(response.read())["error"]


@pytest.mark.parametrize("body, ctype, status", [
    (b"not a zip", "application/x-npz", 400),
    (b"{", "application/json", 400),
    (b'{"x": [1]}', "application/json", 400),
    (b"x", "text/plain", 415),
])
def test_malformed_bodies_get_one_line_json_errors(server, body, ctype, status) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": ctype})
    response = conn.getresponse()
    payload = json.loads(response.read())
    assert response.status == status and "\n" not in payload["error"]


def test_missing_length_and_unsupported_method_get_json_errors_too(server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.putrequest("POST", "/v1/infer")
    conn.endheaders()  # no Content-Length
    response = conn.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("PUT", "/v1/infer", body=b"")
    response = conn.getresponse()
    assert response.status == 501 and "error" in json.loads(response.read())


def test_client_stalling_mid_body_gets_408_and_the_server_keeps_serving(host, double_plus_one) -> None:
    host.swap("affine", double_plus_one)
    with ApiServer("127.0.0.1", 0, host, limits=ApiLimits(body_timeout_s=0.3)) as api:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
        conn.putrequest("POST", "/v1/infer")
        conn.putheader("Content-Type", "application/x-npz")
        conn.putheader("Content-Length", "100")
        conn.endheaders(b"only ten b")
        response = conn.getresponse()  # waits for the server's timeout, not a sleep here
        assert response.status == 408 and response.getheader("Connection") == "close"
        assert EdgeClient(api.url).infer({"x": X})["y"].shape == (2, 4)


def test_no_active_model_is_a_503(server, host) -> None:
    host.swap("affine", None)
    with pytest.raises(ApiError) as err:
        EdgeClient(server.url).infer({"x": X})
    assert err.value.status == 503 and "no model is active" in str(err.value)
    status = EdgeClient(server.url).status()
    assert status["model"] is None and status["models"] == {}


def test_unknown_path_is_a_404(server) -> None:
    with pytest.raises(ApiError) as err:
        EdgeClient(server.url)._call("GET", "/v2/nothing")
    assert err.value.status == 404


def test_status_reports_the_active_model_uptime_and_daemon_fields(server) -> None:
    status = EdgeClient(server.url).status()
    model = status["model"]
    assert (model["name"], model["version"], model["variant"]) == ("affine", "1.0.0", "onnx-fp32")
    assert (model["provider"], model["runtime"], model["package_id"]) == ("CPUExecutionProvider", "onnxruntime", "ab" * 32)
    assert model["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 4]}]
    assert model["outputs"][0]["name"] == "y"
    assert status["uptime_s"] >= 0 and status["device_id"] == "dev-1"
    assert status["models"] == {"affine": model}


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def _samples(text: str) -> dict[str, float]:
    """Sample line -> value of a Prometheus text exposition; fails on a malformed line, a family
    declared twice or a sample outside its declared family."""
    samples: dict[str, float] = {}
    declared: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith("#"):
            match = re.match(r"^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) .+$", line)
            assert match, line
            assert (match.group(1), match.group(2)) not in declared, f"declared twice: {line!r}"
            declared.append((match.group(1), match.group(2)))
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        family = declared[-1][1]
        assert re.fullmatch(re.escape(family) + r"(_bucket|_sum|_count)?", match.group(1)), (family, line)
        key = match.group(1) + (match.group(2) or "")
        assert key not in samples, f"sample repeated: {line!r}"
        samples[key] = float(match.group(3))
    return samples


def test_metrics_are_prometheus_text_and_count_requests(server) -> None:
    client = EdgeClient(server.url)
    for _ in range(3):
        client.infer({"x": X})
    with pytest.raises(ApiError):
        client.infer({"bad": X})
    text = client.metrics_text()
    samples = _samples(text)
    assert samples['edge_inference_requests_total{model="affine",status="ok"}'] == 3
    assert samples['edge_inference_requests_total{model="affine",status="error"}'] == 1
    assert samples['edge_inference_requests_total{status="error"}'] == 0  # none refused before a model
    assert samples['edge_inference_rejected_total{model="affine"}'] == 1
    assert samples['edge_inference_latency_ms_count{model="affine"}'] == 3
    assert samples['edge_inference_latency_ms_bucket{model="affine",le="+Inf"}'] == 3
    assert 'edge_inference_latency_quantile_ms{model="affine",quantile="0.99"}' in samples
    info = [k for k in samples if k.startswith("edge_model_info{")]
    assert len(info) == 1 and 'variant="onnx-fp32"' in info[0] and 'provider="CPUExecutionProvider"' in info[0]
    assert samples["edge_model_active"] == 1 and samples["edge_models_active"] == 1
    assert samples["process_resident_memory_bytes"] > 0


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8700", ("127.0.0.1", 8700)),
    ("localhost", ("localhost", 8700)),
    ("[::1]:9000", ("::1", 9000)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
])
def test_parse_address(text, expected) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1:http", ":8700", "::1:8700", "[::1", "h:70000"])
def test_parse_address_rejects_malformed(text) -> None:
    with pytest.raises(ConfigError, match="api address"):
        parse_address(text)


def test_refuses_a_non_loopback_bind_unless_explicitly_allowed(host) -> None:
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("0.0.0.0")
    with pytest.raises(ConfigError, match="not loopback"):
        ApiServer("0.0.0.0", 0, host)
    ApiServer("0.0.0.0", 0, host, allow_remote=True)  # constructing is allowed; not started


def test_client_reports_an_unreachable_agent_as_an_edge_error(server) -> None:
    url = server.url
    server.stop()
    with pytest.raises(ApiUnreachableError) as err:
        EdgeClient(url, timeout_s=2).status()
    assert isinstance(err.value, EdgeError) and err.value.status is None


def test_client_keeps_one_connection_and_reopens_it_after_a_server_restart(host, double_plus_one) -> None:
    host.swap("affine", double_plus_one)
    with ApiServer("127.0.0.1", 0, host) as api:
        port = api.port
        client = EdgeClient(api.url)
        client.infer({"x": X})
        first = client._local.conn.sock
        client.infer({"x": X})
        assert client._local.conn.sock is first  # the same TCP connection served both calls
    with ApiServer("127.0.0.1", port, host):  # the kept connection died with the old server
        assert client.infer({"x": X})["y"].shape == (2, 4)
