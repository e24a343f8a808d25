"""The local API under hostile or heavy callers: real HTTP over loopback, real runtime sessions.

Each test is named after the attack (or load) it survives; each asserts what the device kept.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import psutil
import pytest
from onnx import TensorProto, helper

from agent.api import ApiLimits, ApiServer
from agent.client import ApiError, EdgeClient
from agent.model_host import ActiveModel, ModelHost
from agent.telemetry import LatencyRecorder, ProcessStats
from edgesdk import runtime
from edgesdk.errors import ConfigError
from tests.fixtures.concurrency import call_at_once
from tests.fixtures.tiny_models import mlp_model

MIB = 1024 * 1024


@pytest.fixture
def host(tmp_path: Path) -> ModelHost:
    return ModelHost(LatencyRecorder(tmp_path / "state.json", probe=lambda: ProcessStats(1.0, 50.0)))


def serving(session: runtime.Session, name: str = "m") -> ActiveModel:
    return ActiveModel(session=session, package_id="cd" * 32, name=name, version="1.0.0", variant="v",
                       provider=session.provider, runtime=session.runtime, inputs=session.inputs,
                       outputs=session.outputs)


def affine_model(path: Path) -> Path:
    """y = 2x + 1 on float32 [N, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])],
        "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def affine(tmp_path: Path, host: ModelHost) -> ActiveModel:
    """y = 2x + 1 on float32 [N, 4], on onnxruntime, active as model ``m``."""
    active = serving(runtime.open_session(affine_model(tmp_path / "affine.onnx"), "onnxruntime", "CPUExecutionProvider"))
    host.swap(active.name, active)
    return active


@pytest.fixture
def api_factory(host: ModelHost) -> Iterator[Callable[..., ApiServer]]:
    started: list[ApiServer] = []

    def make(**kwargs) -> ApiServer:  # noqa: ANN003 - ApiServer's keywords
        api = ApiServer("127.0.0.1", 0, host, **kwargs)
        api.start()
        started.append(api)
        return api

    yield make
    for api in started:
        api.stop()


X = np.arange(8, dtype=np.float32).reshape(2, 4)


def raw_request(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as-is on a fresh connection; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def serves_normally(api: ApiServer) -> bool:
    client = EdgeClient(api.url, timeout_s=10)
    try:
        return np.array_equal(client.infer({"x": X})["y"], X * 2 + 1)
    finally:
        client.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll a condition the server exposes no event for (its counters), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.01)
    return True


# -- concurrent callers on every runtime ----------------------------------------------------------

CALLERS, CALLS = 4, 15


def call_concurrently(api: ApiServer, feeds: list[dict[str, np.ndarray]],
                      expected: list[dict[str, np.ndarray]]) -> tuple[list[str], int]:
    """CALLERS threads of one EdgeClient (a connection each) call at once; (errors, wrong answers)."""
    client = EdgeClient(api.url, timeout_s=30)
    try:
        return call_at_once(client.infer, feeds, expected, CALLS)
    finally:
        client.close()


def _mlp_case(tmp_path: Path, rt: str, provider: str) -> tuple[runtime.Session, list[dict[str, np.ndarray]]]:
    # ~1 ms a call, batch "N": four callers' runs overlap, each with its own shape.
    path = mlp_model(tmp_path / "mlp.onnx", in_dim=256, hidden=512, batch="N")
    rng = np.random.default_rng(11)
    feeds = [{"input": rng.normal(size=(4 + 8 * i, 256)).astype(np.float32)} for i in range(CALLERS)]
    return runtime.open_session(path, rt, provider), feeds


def _check_concurrent_callers(tmp_path: Path, host: ModelHost, api_factory: Callable[..., ApiServer],
                              rt: str, provider: str) -> None:
    session, feeds = _mlp_case(tmp_path, rt, provider)
    expected = [session.run(f) for f in feeds]  # the single-threaded answers
    host.swap("m", serving(session))
    api = api_factory(limits=ApiLimits(max_concurrency=CALLERS))
    errors, wrong = call_concurrently(api, feeds, expected)
    assert errors == [] and wrong == 0
    assert api.requests() == {"ok": CALLERS * CALLS, "error": 0}


def test_concurrent_callers_on_openvino_all_succeed_and_match(tmp_path, host, api_factory) -> None:
    # With one OpenVINO infer request shared by all callers, two calls in three got a 500
    # "Infer Request is busy".
    _check_concurrent_callers(tmp_path, host, api_factory, "openvino", "CPU")


def test_concurrent_callers_on_onnxruntime_all_succeed_and_match(tmp_path, host, api_factory) -> None:
    _check_concurrent_callers(tmp_path, host, api_factory, "onnxruntime", "CPUExecutionProvider")


def test_concurrent_callers_on_litert_all_succeed_and_match(tmp_path, host, api_factory) -> None:
    pytest.importorskip("ai_edge_litert.interpreter")
    from tests.fixtures.tiny_models import tflite_dense_model

    weights = np.random.default_rng(3).normal(size=(64, 256)).astype(np.float32)
    session = runtime.open_session(tflite_dense_model(tmp_path / "dense.tflite", weights), "litert", "XNNPACK")
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.normal(size=(1 + 5 * i, 256)).astype(np.float32)} for i in range(CALLERS)]
    expected = [session.run(f) for f in feeds]
    host.swap("m", serving(session))
    api = api_factory(limits=ApiLimits(max_concurrency=CALLERS))
    errors, wrong = call_concurrently(api, feeds, expected)
    assert errors == [] and wrong == 0


# -- connections that cost threads or hang workers ------------------------------------------------

def test_idle_connections_do_not_spawn_threads(affine, api_factory) -> None:
    api = api_factory()
    threads_before = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", api.port), timeout=5) for _ in range(200)]
    try:
        for sock in socks[100:]:  # half of them start a request and never finish its headers
            sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert wait_until(lambda: api.connections()["idle"] == 200)
        assert threading.active_count() == threads_before  # a fixed pool, not a thread per connection
        assert serves_normally(api)
    finally:
        for sock in socks:
            sock.close()


def test_connection_flood_past_the_limit_closes_the_oldest_idle_one(affine, api_factory) -> None:
    api = api_factory(limits=ApiLimits(max_connections=10))
    socks = [socket.create_connection(("127.0.0.1", api.port), timeout=5) for _ in range(10)]
    try:
        assert wait_until(lambda: api.connections()["idle"] == 10)
        assert serves_normally(api)  # admitted by closing the longest-idle connection
        assert socks[0].recv(1) == b""  # ...which was the first one opened
        assert api.connections()["idle"] <= 10
    finally:
        for sock in socks:
            sock.close()


def test_slowloris_header_is_cut_off_by_timeout(affine, api_factory) -> None:
    # One worker: if the slow client held it, the normal call below could not be served.
    api = api_factory(limits=ApiLimits(header_timeout_s=1.0, workers=1))
    head = f"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nContent-Type: application/json\r\n"
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=5)
    sock.settimeout(0.25)  # the pace of the attack: a byte, then up to 0.25 s waiting for the verdict
    started, answer, sent = time.monotonic(), b"", 0
    try:
        while time.monotonic() - started < 15 and sent < len(head):
            try:
                sock.sendall(head[sent].encode())
            except OSError:
                break  # the server has closed the connection
            sent += 1
            if sent == 2:
                assert serves_normally(api)  # while the slow request is in progress
            try:
                answer = sock.recv(4096)
                break  # the server answered (408) or closed
            except TimeoutError:
                continue
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert sent < len(head), "the server let the slow client send its whole header"
    assert elapsed < 5.0  # header_timeout_s plus scheduling slack, not the old 30 s per byte
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
    assert wait_until(lambda: api.connections()["refused"] >= 1)  # counted just after the close
    assert serves_normally(api)


def test_workers_waiting_for_a_next_call_never_hold_back_other_connections(affine, api_factory) -> None:
    # After an answer a worker may wait (linger_s) on that connection for the caller's next call;
    # at most half of them do, so with 2 workers a third caller is served at once, not after 5 s.
    api = api_factory(limits=ApiLimits(workers=2, linger_s=5.0))
    clients = [EdgeClient(api.url, timeout_s=10) for _ in range(3)]
    try:
        for client in clients[:2]:
            assert np.array_equal(client.infer({"x": X})["y"], X * 2 + 1)  # each may leave a worker waiting
        started = time.monotonic()
        assert np.array_equal(clients[2].infer({"x": X})["y"], X * 2 + 1)
        assert time.monotonic() - started < 2.5
        started = time.monotonic()
        assert np.array_equal(clients[0].infer({"x": X})["y"], X * 2 + 1)  # a kept connection, either way
        assert time.monotonic() - started < 2.5
    finally:
        for client in clients:
            client.close()


def test_slowloris_after_a_good_call_is_still_cut_off(affine, api_factory) -> None:
    # A caller whose worker lingers after its first answer drips its second request's header.
    api = api_factory(limits=ApiLimits(header_timeout_s=1.0, workers=2, linger_s=0.5))
    body = json.dumps({"inputs": {"x": X.tolist()}}).encode()
    request = (f"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200 and json.loads(response.read())["outputs"]["y"] == (X * 2 + 1).tolist()
        started, answer = time.monotonic(), b""
        sock.settimeout(0.2)
        for byte in request[:40]:
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(4096)
                break  # answered (408) or closed
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert elapsed < 5.0  # linger_s + header_timeout_s + slack, never the 8 s of 40 bytes
    assert serves_normally(api)


@pytest.mark.parametrize("linger", [-0.1, 61.0, True, "2ms"])
def test_linger_is_checked_when_the_limits_are_built(linger) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="linger_s"):
        ApiLimits(linger_s=linger, idle_timeout_s=60.0)


def test_slow_drip_body_is_cut_off_by_body_timeout(affine, api_factory) -> None:
    api = api_factory(limits=ApiLimits(body_timeout_s=1.0))
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=5)
    sock.sendall(f"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 100\r\n\r\n".encode())
    sock.settimeout(0.25)  # a body byte, then up to 0.25 s waiting for the verdict
    started, answer, sent = time.monotonic(), b"", 0
    try:
        while time.monotonic() - started < 15 and sent < 100:
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sent += 1
            try:
                answer = sock.recv(4096)
                break
            except TimeoutError:
                continue
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert sent < 100 and elapsed < 5.0  # the deadline covers the whole body, not each byte
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
    assert serves_normally(api)


# -- bodies ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("claimed", [100 * MIB, 4096 * MIB], ids=["100MiB", "4GiB"])
def test_oversized_body_refused_before_reading(affine, api_factory, claimed) -> None:
    api = api_factory(limits=ApiLimits(max_body_bytes=1 * MIB, max_buffered_bytes=1 * MIB))
    rss_before = psutil.Process().memory_info().rss
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        # Headers only: the 413 must come without the server waiting for (or storing) the body.
        sock.sendall(f"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nContent-Type: application/x-npz"
                     f"\r\nContent-Length: {claimed}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 413 and "limit is 1048576" in json.loads(response.read())["error"]
    assert psutil.Process().memory_info().rss - rss_before < 16 * MIB  # nothing near the claimed size
    assert serves_normally(api)


@pytest.mark.parametrize("lengths", [
    ["abc"], ["-1"], ["1e3"], ["+5"], ["5 5"], ["0x10"], [""], ["5, 6"], ["5", "6"], ["١٢"],
], ids=["word", "negative", "exponent", "plus", "space", "hex", "empty", "list", "two-headers", "arabic-digits"])
def test_malformed_content_length_is_400(affine, api_factory, lengths) -> None:
    api = api_factory()
    cl = "".join(f"Content-Length: {v}\r\n" for v in lengths)
    for method, path in (("POST", "/v1/infer"), ("GET", "/v1/status")):
        status, headers, body = raw_request(api.port, (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nContent-Type: application/json\r\n"
            f"{cl}\r\n{{}}").encode())
        assert status == 400 and "Content-Length" in json.loads(body)["error"]
        assert headers.get("connection") == "close"  # the stream's framing is unknown: not reused
    assert serves_normally(api)


def _slow_sum(tmp_path: Path) -> ActiveModel:
    """y = sum((W * sum(x)) @ W @ ... @ W) over float32 x [N, 4]: a big input, a one-number answer
    (answers cost nothing), and ~0.1-0.3 s of run during which other requests would decode."""
    w = np.random.default_rng(1).normal(size=(512, 512)).astype(np.float32) / 512
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Mul", ["w", "s"], ["m0"])]
    nodes += [helper.make_node("MatMul", [f"m{i}", "w"], [f"m{i + 1}"]) for i in range(8)]
    nodes.append(helper.make_node("ReduceSum", ["m8"], ["y"], keepdims=0))
    graph = helper.make_graph(nodes, "slow_sum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "slow_sum.onnx")
    return serving(runtime.open_session(tmp_path / "slow_sum.onnx", "onnxruntime", "CPUExecutionProvider",
                                        threads=1))


def _peak_rss_since_reset() -> Callable[[], int]:
    """Reset this process's peak RSS (VmHWM); return a function reading the peak since then."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def peak() -> int:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    return peak


def test_decoding_happens_inside_concurrency_limit(tmp_path, host, api_factory) -> None:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak RSS")
    host.swap("m", _slow_sum(tmp_path))
    rows = np.random.default_rng(0).random((150_000, 4)).round(6)
    body = json.dumps({"inputs": {"x": rows.tolist()}}).encode()  # ~6 MB; ~6x that once decoded
    n = 4
    api = api_factory(limits=ApiLimits(max_concurrency=1, workers=n, max_body_bytes=16 * MIB,
                                       queue_timeout_s=120, body_timeout_s=120))

    def post(results: list[int]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=120)
        conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        results.append(response.status)
        conn.close()

    def peak_growth(callers: int) -> int:
        results: list[int] = []
        peak = _peak_rss_since_reset()
        base = psutil.Process().memory_info().rss
        threads = [threading.Thread(target=post, args=(results,)) for _ in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert results == [200] * callers
        return peak() - base

    post([])  # warm up: first-use allocations are not the request's cost
    one = peak_growth(1)
    together = peak_growth(n)
    # One decode at a time, plus the raw bodies of the callers waiting for the slot. Decoding
    # before the limit (as before) held all n decoded bodies at once: about n times `one`.
    assert together < one + n * len(body) + one // 2, (one, together, len(body))


def test_request_waiting_past_queue_timeout_for_a_slot_gets_503(tmp_path, host, api_factory) -> None:
    entered, release = threading.Event(), threading.Event()

    class Blocking:
        input_names, output_names = ["x"], ["y"]

        def run(self, feeds):
            entered.set()
            release.wait(30)
            return {"y": feeds["x"]}

    host.swap("b", ActiveModel(session=Blocking(), package_id="ef" * 32, name="b", version="1", variant="v",
                               provider="CPU", runtime="test"))
    api = api_factory(limits=ApiLimits(max_concurrency=1, queue_timeout_s=0.3))
    first = threading.Thread(target=lambda: EdgeClient(api.url).infer({"x": X}))
    first.start()
    try:
        assert entered.wait(10)
        with pytest.raises(ApiError) as err:
            EdgeClient(api.url).infer({"x": X})
        assert err.value.status == 503 and "busy" in str(err.value)
    finally:
        release.set()
        first.join(10)
    assert EdgeClient(api.url).infer({"x": X})["y"].tolist() == X.tolist()


# -- who may call ---------------------------------------------------------------------------------

def _get_status(port: int, host_header: str | None) -> int:
    lines = ["GET /v1/status HTTP/1.1"] + ([f"Host: {host_header}"] if host_header is not None else [])
    return raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode())[0]


def test_dns_rebinding_host_header_is_refused(affine, api_factory) -> None:
    api = api_factory()
    port = api.port
    # A page on evil.example whose DNS name now points at 127.0.0.1 sends its own name as Host.
    for refused in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"localhost.evil:{port}",
                    f"127.0.0.1:{port}@evil", "", f"[::1]x:{port}"):
        assert _get_status(port, refused) == 403, refused
    for accepted in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert _get_status(port, accepted) == 200, accepted
    assert _get_status(port, None) == 400  # HTTP/1.1 requires a Host
    status, _, body = raw_request(port, (
        f"POST /v1/infer HTTP/1.1\r\nHost: evil.example:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: 2\r\n\r\n{{}}").encode())
    assert status == 403 and "not this API" in json.loads(body)["error"]
    assert api.requests()["ok"] == 0


def test_allowed_hosts_is_a_constructor_value(affine, api_factory) -> None:
    api = api_factory(allowed_hosts=["edge.local"])
    assert _get_status(api.port, f"edge.local:{api.port}") == 200
    assert _get_status(api.port, f"localhost:{api.port}") == 403


# -- input that once killed or stalled a thread ---------------------------------------------------

@pytest.mark.parametrize("data", [
    b"\x00\x01\x02\x03garbage\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /v1/status\r\n\r\n",
    b"GET  /v1/status HTTP/1.1\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n folded: line\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"POST /v1/infer HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /v1/infer HTTP/1.1\r\nHost: HOST\r\nContent-Type: application/json\r\nContent-Length: 20003\r\n\r\n"
    + b"[" * 20000 + b"1" + b"]" * 2,
    b"POST /v1/infer HTTP/1.1\r\nHost: HOST\r\nContent-Type: application/x-npz\r\nContent-Length: 4\r\n\r\nPK\x03\x04",
    b"DELETE /v1/infer HTTP/1.1\r\nHost: HOST\r\n\r\n",
], ids=["binary", "http2-preface", "http09", "double-space", "obs-fold", "space-in-name", "huge-header",
        "chunked", "deep-json", "truncated-zip", "delete"])
def test_malformed_requests_get_an_answer_and_kill_no_server_thread(affine, api_factory, data) -> None:
    api = api_factory(limits=ApiLimits(workers=2))
    threads_before = threading.active_count()
    status, _, body = raw_request(api.port, data.replace(b"HOST", f"127.0.0.1:{api.port}".encode()))
    assert 400 <= status < 600 and status != 500 and "\n" not in json.loads(body)["error"]
    assert threading.active_count() == threads_before
    assert serves_normally(api)


def test_chunked_body_after_a_status_request_is_not_read_as_a_second_request(affine, api_factory) -> None:
    # Request smuggling: a body the server does not parse must not be taken for the next request.
    api = api_factory()
    smuggled = b"GET /v1/status HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    data = (f"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"{len(smuggled):x}\r\n").encode() + smuggled + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(data)
        answers = b""
        while chunk := sock.recv(65536):  # the server closes after its one answer
            answers += chunk
    assert answers.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in answers


# -- model names in the path ----------------------------------------------------------------------

@pytest.mark.parametrize("segment", [
    b"..%2f", b"..", b"%2e%2e%2f%2e%2e", b"m%2f..%2fm", b"a" * 10_000, b"m" * 65, b"%00", b"m%00", b"\x00",
    b"%ff%fe", "d\u00e9tecteur".encode(), "%E2%80%AEm".encode(), b"-m", b"$SYS", b"m;rm", b"%", b"",
], ids=["dotdot-encoded-slash", "dotdot", "encoded-dotdot", "traversal", "10k-chars", "65-chars", "nul-encoded",
        "m-nul", "nul-raw", "bad-utf8", "unicode-raw", "bidi-override", "leading-dash", "dollar", "semicolon",
        "lone-percent", "empty"])
def test_hostile_model_names_in_the_path_are_a_one_line_404(affine, api_factory, segment) -> None:
    api = api_factory(limits=ApiLimits(workers=2))
    threads_before = threading.active_count()
    host_header = f"127.0.0.1:{api.port}".encode()
    for method, path in ((b"POST", b"/v1/models/" + segment + b"/infer"), (b"GET", b"/v1/models/" + segment)):
        status, _, body = raw_request(api.port, method + b" " + path + b" HTTP/1.1\r\nHost: " + host_header
                                      + b"\r\nContent-Type: application/json\r\nContent-Length: 26\r\n\r\n"
                                      + b'{"inputs": {"x": [[1,2]]}}')
        error = json.loads(body)["error"]
        assert status == 404, (method, status, error)
        assert "\n" not in error and len(error) < 400 and "a" * 65 not in error and "m" * 65 not in error
    assert api.requests() == {"ok": 0, "error": 1}  # the POST, under no model
    assert threading.active_count() == threads_before
    assert serves_normally(api)
    assert EdgeClient(api.url).infer({"x": X}, model="m")["y"].tolist() == (X * 2 + 1).tolist()
