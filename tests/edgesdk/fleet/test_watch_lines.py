"""`edgesdk telemetry watch` lines for a device that runs several models: each model by name and
`name@version`, the model of an event and of a telemetry window; device-supplied text stays literal."""

from __future__ import annotations

import pytest

from edgesdk.cli.fleet_cmd import _show
from edgesdk.protocol import DeviceState, InstallEvent, InstallEventKind, TelemetryWindow

TOPIC = "edgesdk/v1/f/devices/cam-1/"
DET = {"name": "det", "version": "1.0", "package_id": "ab" * 32, "variant": "onnx-fp32", "provider": "CPU",
       "runtime": "onnxruntime"}
OCR = {"name": "ocr", "version": "2.1", "package_id": "cd" * 32, "variant": "int8", "provider": "CUDA",
       "runtime": "onnxruntime"}

LINES = [
    ("state", DeviceState("cam-1", True, models=[DET, OCR]),
     "cam-1 state: online, active det@1.0 (onnx-fp32 on CPU), ocr@2.1 (int8 on CUDA)"),
    ("state", DeviceState("cam-1", True), "cam-1 state: online, no active model"),
    ("state", DeviceState("cam-1", False, active_package="ab" * 32, active_variant="fp32", provider="CPU"),
     "cam-1 state: offline, active abababababab fp32 on CPU"),  # an agent older than `models`
    ("state", DeviceState("cam-1", True, models=[{**DET, "name": "x\x1b[2J", "version": "[bold]9"}]),
     "cam-1 state: online, active x\\x1b[2J@[bold]9 (onnx-fp32 on CPU)"),
    ("events", InstallEvent(kind=InstallEventKind.UNDEPLOYED, package_id="ab" * 32, at=1.0, model="det"),
     "cam-1 event undeployed det abababababab"),
    ("events", InstallEvent(kind=InstallEventKind.REFUSED, package_id="", at=1.0, reason="expired"),
     "cam-1 event refused expired"),
    ("telemetry", TelemetryWindow(seq=3, window_start=1, window_end=2, count=5, errors=1, p50_ms=1.5, model="ocr",
                                  variant="int8", provider="CUDA"),
     "cam-1 telemetry #3 ocr: 5 calls, 1 errors, p50 1.500 p95 — p99 — max — ms — int8 on CUDA"),
    ("telemetry", TelemetryWindow(seq=4, window_start=1, window_end=2, count=0, errors=0),
     "cam-1 telemetry #4: 0 calls, 0 errors, p50 — p95 — p99 — max — ms — None on None"),
]


@pytest.mark.parametrize("kind, message, line", LINES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(LINES)])
def test_watch_line_names_each_model(capsys, kind: str, message, line: str) -> None:
    counted = _show(TOPIC + kind, message.to_json(), as_json=False)
    assert counted is (kind == "telemetry")
    assert capsys.readouterr().out.splitlines() == [line]
