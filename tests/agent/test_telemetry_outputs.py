"""Output summaries in the agent's telemetry windows: a real onnxruntime classifier through
ModelHost and LatencyRecorder, what a window reports about the model's answers, and the budget
that keeps summarizing from slowing inference."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.model_host import ActiveModel, InvalidInputError, ModelHost
from agent.telemetry import ALWAYS_SUMMARIZED, SUMMARY_BUDGET, LatencyRecorder, ProcessStats
from edgesdk.protocol import TelemetryWindow
from edgesdk.protocol.outputs import parse_window_outputs
from edgesdk.runtime import Session, open_session

FEATURES, CLASSES = 8, 5
RNG = np.random.default_rng(2024)
WEIGHTS = RNG.normal(size=(FEATURES, CLASSES)).astype(np.float32)
BIAS = RNG.normal(size=CLASSES).astype(np.float32)


def classifier_model(path: Path) -> Path:
    """logits = x @ W + b on float32 [N, 8] -> [N, 5], plus the argmax as a string output (which
    no summary can hold: it must be skipped)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["index"], axis=1, keepdims=0),
         helper.make_node("Cast", ["index"], ["label"], to=TensorProto.STRING)],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
         helper.make_tensor_value_info("label", TensorProto.STRING, ["N"])],
        [helper.make_tensor("w", TensorProto.FLOAT, list(WEIGHTS.shape), WEIGHTS.reshape(-1).tolist()),
         helper.make_tensor("b", TensorProto.FLOAT, [CLASSES], BIAS.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


class StepTimer:
    """A perf_counter stand-in that advances ``step_s`` per reading: a timed span of two readings
    lasts exactly ``step_s``."""

    def __init__(self, step_s: float) -> None:
        self._ticks = itertools.count()
        self.step_s = step_s

    def __call__(self) -> float:
        return next(self._ticks) * self.step_s


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    path = classifier_model(tmp_path_factory.mktemp("classifier") / "classifier.onnx")
    with open_session(path, "onnxruntime", "CPUExecutionProvider", threads=1) as sess:
        yield sess


def _model(session: Session) -> ActiveModel:
    return ActiveModel(session=session, package_id="cd" * 32, name="classifier", version="1.0.0",
                       variant="onnx-fp32", provider="CPUExecutionProvider", runtime="onnxruntime",
                       inputs=[{"name": "x", "dtype": "float32", "shape": ["N", FEATURES]}])


def _host(tmp_path: Path, session: Session, *, infer_step_s: float | None = None,
          summary_timer: StepTimer | None = None) -> ModelHost:
    kwargs = {"timer": summary_timer} if summary_timer is not None else {}
    recorder = LatencyRecorder(tmp_path / "state.json", clock=lambda: 1000.0,
                               probe=lambda: ProcessStats(1.0, 50.0), **kwargs)
    host = ModelHost(recorder, **({"timer": StepTimer(infer_step_s)} if infer_step_s is not None else {}))
    host.swap("classifier", _model(session))
    return host


def _roll(host: ModelHost) -> TelemetryWindow:
    [window] = host.recorder.roll(now=1060.0, contexts=[_model_context(host)])
    return window


def _model_context(host: ModelHost):  # type: ignore[no-untyped-def]
    return host.get("classifier").context  # type: ignore[union-attr]


def _batches(count: int, rows: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [rng.normal(size=(rows, FEATURES)).astype(np.float32) for _ in range(count)]


def test_window_reports_the_classifiers_answers_and_argmax_histogram_of_numpy(tmp_path: Path,
                                                                              session: Session) -> None:
    host = _host(tmp_path, session)
    batches = _batches(20)
    for x in batches:
        host.infer({"x": x})
    window = _roll(host)
    logits = np.concatenate([x @ WEIGHTS + BIAS for x in batches])  # what the model computes, by numpy
    want_argmax = np.bincount(logits.argmax(axis=1), minlength=CLASSES)
    outputs = window.extra["outputs"]
    assert list(outputs) == ["logits"]  # the string output "label" is skipped
    summary = outputs["logits"]
    assert summary["argmax"] == {str(i): int(n) for i, n in enumerate(want_argmax) if n}
    assert (summary["calls"], summary["count"], summary["nonfinite"]) == (20, logits.size, 0)
    assert summary["mean"] == pytest.approx(float(logits.mean()), rel=1e-5)
    assert summary["std"] == pytest.approx(float(logits.std()), rel=1e-5)
    # What a collector receives reads back the same.
    received = TelemetryWindow.from_json(window.to_json(), "devices/cam-01/telemetry")
    parsed = parse_window_outputs(received.extra, "devices/cam-01/telemetry")
    back = parsed["logits"]
    assert (back.calls, back.count, back.nonfinite) == (20, logits.size, 0)
    assert (back.mean, back.std) == pytest.approx((summary["mean"], summary["std"]), rel=1e-12)
    assert back.argmax == {i: int(n) for i, n in enumerate(want_argmax) if n}


def test_a_window_with_no_successful_call_has_no_outputs(tmp_path: Path, session: Session) -> None:
    host = _host(tmp_path, session)
    heartbeat = _roll(host)
    assert heartbeat.count == 0 and "outputs" not in heartbeat.extra
    with pytest.raises(InvalidInputError):
        host.infer({"x": np.zeros((1, FEATURES + 1), dtype=np.float32)})  # rejected: never ran
    rejected_only = _roll(host)
    assert rejected_only.extra["rejected"] == 1 and "outputs" not in rejected_only.extra


def test_each_window_summarizes_its_own_calls(tmp_path: Path, session: Session) -> None:
    host = _host(tmp_path, session)
    for x in _batches(3):
        host.infer({"x": x})
    first = _roll(host)
    host.infer({"x": _batches(1)[0]})
    [second] = host.recorder.roll(now=1120.0, contexts=[_model_context(host)])
    assert first.extra["outputs"]["logits"]["calls"] == 3
    assert second.extra["outputs"]["logits"]["calls"] == 1


def test_after_the_first_calls_cheap_inference_gets_fewer_summaries_than_calls(tmp_path: Path,
                                                                                session: Session) -> None:
    # Each inference looks like 1 µs to the host: any real summary costs far more than 2% of it.
    host = _host(tmp_path, session, infer_step_s=1e-6)
    made = ALWAYS_SUMMARIZED + 100
    for x in _batches(made, rows=1):
        host.infer({"x": x})
    window = _roll(host)
    summarized = window.extra["outputs"]["logits"]["calls"]
    assert window.count == made
    assert ALWAYS_SUMMARIZED <= summarized < made


def test_summarizing_stays_within_its_share_of_inference_time(tmp_path: Path, session: Session) -> None:
    # Inference takes 10 ms, a summary 1 ms (both by injected timers): after the first calls, about
    # one call in five may be summarized for the summaries to cost 2% of the inference time.
    infer_ms, summary_ms, made = 10.0, 1.0, 1000
    host = _host(tmp_path, session, infer_step_s=infer_ms / 1000, summary_timer=StepTimer(summary_ms / 1000))
    for x in _batches(made, rows=1):
        host.infer({"x": x})
    window = _roll(host)
    spent_ms = window.extra["outputs"]["logits"]["calls"] * summary_ms
    allowed_ms = SUMMARY_BUDGET * made * infer_ms
    assert allowed_ms - summary_ms <= spent_ms <= allowed_ms + summary_ms  # uses its budget, no more
    # A new window starts with its first calls summarized again, then stops at the budget.
    for x in _batches(ALWAYS_SUMMARIZED + 5, rows=1):
        host.infer({"x": x})
    [second] = host.recorder.roll(now=1120.0, contexts=[_model_context(host)])
    assert second.extra["outputs"]["logits"]["calls"] == ALWAYS_SUMMARIZED


def test_concurrent_calls_merge_every_summary_into_the_window(tmp_path: Path, session: Session) -> None:
    host = _host(tmp_path, session, infer_step_s=1.0)  # every call looks slow: all are summarized
    threads_n, per_thread, rows = 4, 25, 3
    barrier = threading.Barrier(threads_n)

    def work() -> None:
        barrier.wait(timeout=10)
        for x in _batches(per_thread, rows=rows):
            host.infer({"x": x})

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    window = _roll(host)
    summary = window.extra["outputs"]["logits"]
    calls = threads_n * per_thread
    assert window.count == calls
    assert (summary["calls"], summary["count"]) == (calls, calls * rows * CLASSES)
    assert sum(summary["argmax"].values()) == calls * rows


class _Unsummarizable(np.ndarray):
    """An output array whose summary fails (reshape raises), standing in for a MemoryError."""

    def reshape(self, *args: object, **kwargs: object) -> np.ndarray:  # type: ignore[override]
        raise MemoryError("no memory for the summary")


class _FailingSummarySession:
    input_names = ["x"]
    output_names = ["y"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.asarray(feeds["x"]).view(_Unsummarizable)}


def test_a_failing_summary_never_fails_the_inference(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = LatencyRecorder(tmp_path / "state.json", clock=lambda: 1000.0, probe=lambda: ProcessStats(1.0, 50.0))
    host = ModelHost(recorder)
    model = ActiveModel(session=_FailingSummarySession(), package_id="ef" * 32, name="odd", version="1",
                        variant="v", provider="CPUExecutionProvider", runtime="onnxruntime")
    host.swap("odd", model)
    for _ in range(3):
        assert host.infer({"x": np.ones((1, 4), dtype=np.float32)})["y"].shape == (1, 4)
    [window] = recorder.roll(now=1060.0, contexts=[model.context])
    assert window.count == 3 and window.errors == 0 and "outputs" not in window.extra
    assert [r.levelname for r in caplog.records if "summarize" in r.getMessage()] == ["WARNING"]
