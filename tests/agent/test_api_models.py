"""Serving several models by name: two real onnxruntime models in one ModelHost behind the local API."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.api import ApiServer
from agent.client import ApiError, EdgeClient
from agent.model_host import ActiveModel, ModelHost
from agent.telemetry import LatencyRecorder, ProcessStats
from tests.agent.test_api import OrtSession, _samples, affine_model
from tests.fixtures.concurrency import call_at_once

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def loaded(path: Path, name: str, version: str, scale: float, bias: float) -> ActiveModel:
    """A real ORT session of y = x * scale + bias, served as ``name@version``."""
    return ActiveModel(session=OrtSession(affine_model(path, scale, bias)), package_id=name[0] * 64, name=name,
                       version=version, variant="onnx-fp32", provider="CPUExecutionProvider", runtime="onnxruntime",
                       inputs=[{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
                       outputs=[{"name": "y", "dtype": "float32", "shape": ["N", 4]}])


@pytest.fixture
def host(tmp_path: Path) -> ModelHost:
    return ModelHost(LatencyRecorder(tmp_path / "state.json", probe=lambda: ProcessStats(1.0, 50.0)))


@pytest.fixture
def models(tmp_path: Path, host: ModelHost) -> dict[str, ActiveModel]:
    """``detector`` (y = 2x + 1) and ``ranker`` (y = 3x), both active."""
    out = {"detector": loaded(tmp_path / "d.onnx", "detector", "1.0.0", 2.0, 1.0),
           "ranker": loaded(tmp_path / "r.onnx", "ranker", "2.1.0", 3.0, 0.0)}
    for name, model in out.items():
        host.swap(name, model)
    return out


@pytest.fixture
def api(host: ModelHost, models: dict[str, ActiveModel]) -> Iterator[ApiServer]:
    with ApiServer("127.0.0.1", 0, host) as server:
        yield server


def expected(name: str, x: np.ndarray) -> np.ndarray:
    return x * 2 + 1 if name == "detector" else x * 3


def post(api: ApiServer, path: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_two_models_are_served_by_name_at_once_with_their_own_answers(api, models) -> None:
    rng = np.random.default_rng(7)
    names = ["detector", "ranker"] * 3
    feeds = [{"x": rng.normal(size=(1 + i, 4)).astype(np.float32)} for i in range(len(names))]
    answers = [{"y": models[n].session.run(f)["y"]} for n, f in zip(names, feeds)]  # a lone caller's answers
    route = {id(f): n for f, n in zip(feeds, names)}
    client = EdgeClient(api.url, timeout_s=30)
    try:
        errors, wrong = call_at_once(lambda f: client.infer(f, model=route[id(f)]), feeds, answers, 20)
    finally:
        client.close()
    assert errors == [] and wrong == 0
    assert api.requests_by_model() == {"detector": {"ok": 60, "error": 0}, "ranker": {"ok": 60, "error": 0}}
    windows = api.model_host.recorder.roll(contexts=[m.context for m in models.values()])
    assert [(w.model, w.count) for w in windows] == [("detector", 60), ("ranker", 60)]


def test_json_inference_by_name_says_which_release_answered(api) -> None:
    doc = EdgeClient(api.url).infer_json({"x": X.tolist()}, model="ranker")
    assert doc["outputs"]["y"] == (X * 3).tolist() and doc["model"] == "ranker@2.1.0"
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    conn.request("POST", "/v1/models/detector/infer", body=json.dumps({"inputs": {"x": X.tolist()}}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("X-Edge-Model") == "detector@1.0.0"
    assert json.loads(response.read())["outputs"]["y"] == (X * 2 + 1).tolist()


def test_unnamed_infer_with_several_models_is_a_409_listing_them(api) -> None:
    with pytest.raises(ApiError) as err:
        EdgeClient(api.url).infer({"x": X})
    assert err.value.status == 409 and "detector, ranker" in str(err.value) and "\n" not in str(err.value)
    assert api.requests_by_model() == {None: {"ok": 0, "error": 1}}  # counted under no model


def test_unknown_model_name_is_a_404_listing_the_active_models(api) -> None:
    client = EdgeClient(api.url)
    with pytest.raises(ApiError) as err:
        client.infer({"x": X}, model="segmenter")
    assert err.value.status == 404 and "'segmenter'" in str(err.value) and "detector, ranker" in str(err.value)
    with pytest.raises(ApiError) as err:
        client.model("segmenter")
    assert err.value.status == 404 and "detector, ranker" in str(err.value)
    assert api.requests_by_model() == {None: {"ok": 0, "error": 1}}
    assert client.infer({"x": X}, model="ranker")["y"].tolist() == (X * 3).tolist()  # connection still good


def test_bad_input_on_a_named_model_is_a_400_counted_under_that_model(api) -> None:
    status, doc = post(api, "/v1/models/ranker/infer", json.dumps({"inputs": {"z": X.tolist()}}).encode())
    assert status == 400 and "unknown input 'z'" in doc["error"]
    assert api.requests_by_model() == {"ranker": {"ok": 0, "error": 1}}
    [window] = [w for w in api.model_host.recorder.roll() if w.model == "ranker"]
    assert window.extra["rejected"] == 1


def test_models_lists_each_active_model_sorted_by_name(api, models) -> None:
    listed = EdgeClient(api.url).models()
    assert [m["name"] for m in listed] == ["detector", "ranker"]
    for entry in listed:
        model = models[entry["name"]]
        assert entry == {**model.describe(), "release": model.release}
        assert entry["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 4]}]
        assert {"version", "package_id", "variant", "provider", "runtime", "outputs"} <= set(entry)
    assert listed[1]["release"] == "ranker@2.1.0"


def test_one_model_by_name_and_status_of_all(api, models) -> None:
    client = EdgeClient(api.url)
    assert client.model("detector") == {**models["detector"].describe(), "release": "detector@1.0.0"}
    status = client.status()
    assert status["model"] is None  # several are active: no "the" model
    assert status["models"] == {name: m.describe() for name, m in models.items()}


def test_metrics_label_every_inference_family_by_model(api) -> None:
    client = EdgeClient(api.url)
    for _ in range(3):
        client.infer({"x": X}, model="detector")
    client.infer({"x": X}, model="ranker")
    with pytest.raises(ApiError):
        client.infer({"z": X}, model="ranker")
    with pytest.raises(ApiError):
        client.infer({"x": X})  # 409: no model chosen
    samples = _samples(client.metrics_text())
    assert samples['edge_inference_requests_total{model="detector",status="ok"}'] == 3
    assert samples['edge_inference_requests_total{model="ranker",status="ok"}'] == 1
    assert samples['edge_inference_requests_total{model="ranker",status="error"}'] == 1
    assert samples['edge_inference_requests_total{status="error"}'] == 1
    assert samples['edge_inference_latency_ms_count{model="detector"}'] == 3
    assert samples['edge_inference_latency_ms_bucket{model="ranker",le="+Inf"}'] == 1
    assert samples['edge_inference_rejected_total{model="ranker"}'] == 1
    assert samples['edge_inference_rejected_total{model="detector"}'] == 0
    assert samples['edge_inference_errors_total{model="detector"}'] == 0
    assert 'edge_inference_latency_quantile_ms{model="ranker",quantile="0.5"}' in samples
    info = sorted(k for k in samples if k.startswith("edge_model_info{"))
    assert len(info) == 2
    assert 'name="detector",version="1.0.0"' in info[0] and 'name="ranker",version="2.1.0"' in info[1]
    assert samples["edge_models_active"] == 2 and samples["edge_model_active"] == 1
    assert not [k for k in samples if k.startswith("edge_inference_latency_ms") and "model=" not in k]


def test_removing_one_model_never_fails_a_call_on_the_other(api, host, models) -> None:
    stop = threading.Event()
    answers: list[bool] = []  # each answer on ranker matched
    errors: list[str] = []
    enough = threading.Condition()

    def hammer() -> None:
        client = EdgeClient(api.url, timeout_s=30)
        try:
            while not stop.is_set():
                try:
                    ok = np.array_equal(client.infer({"x": X}, model="ranker")["y"], X * 3)
                except Exception as exc:  # noqa: BLE001 - any failure is the finding
                    errors.append(f"{type(exc).__name__}: {exc}")
                    ok = False
                with enough:
                    answers.append(ok)
                    enough.notify_all()
        finally:
            client.close()

    def wait_for(n: int) -> None:
        with enough:
            assert enough.wait_for(lambda: len(answers) >= n or bool(errors), timeout=60)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(100)
        for _ in range(20):  # unload and reload the detector while the ranker serves
            assert host.swap("detector", None) is not None
            wait_for(len(answers) + 10)
            host.swap("detector", models["detector"])
        assert host.swap("detector", None) is models["detector"]
        wait_for(len(answers) + 100)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == [] and all(answers)
    client = EdgeClient(api.url)
    assert client.infer({"x": X})["y"].tolist() == (X * 3).tolist()  # /v1/infer: the only model left
    with pytest.raises(ApiError) as err:
        client.infer({"x": X}, model="detector")
    assert err.value.status == 404 and "(active: ranker)" in str(err.value)
    samples = _samples(client.metrics_text())
    assert samples["edge_models_active"] == 1
    assert samples['edge_inference_requests_total{model="ranker",status="error"}'] == 0
