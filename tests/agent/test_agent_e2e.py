"""The whole loop against a real Mosquitto: publish → serve → deploy → the agent installs, serves
/v1/infer and reports events, telemetry and retained state; then a second version hot-swaps in
under load. The first test runs `edge-agent run` and `edgesdk serve`/`deploy` as the processes
an operator runs; the second drives an in-process Agent to watch its store."""

from __future__ import annotations

import json
import threading
from pathlib import Path


from agent.client import EdgeClient
from edgesdk.protocol import DeviceState, InstallEventKind as K
from tests.agent.agent_harness import (
    FLEET, AgentProcess, Collector, PackageSet, ReferenceModels, ServeProcess, agent_settings, build_config,
    deploy, device_topics, new_device_id, repository, retained, run_cli, running_agent,
    sample_feeds, secure, seeded_data_dir, subprocess_env, wait_until, write_config,
)
from tests.fixtures.broker import free_port

REQUESTS = 25


def test_deploy_installs_serves_and_reports_over_mqtt(secure_mosquitto, packages: PackageSet, refs: ReferenceModels,
                                                      tmp_path: Path) -> None:
    mosquitto = secure(secure_mosquitto)  # the generated policy: TLS, logins, ACL
    device = new_device_id("e2e")
    env = subprocess_env(tmp_path / "home", mosquitto.url)
    api_port = free_port()
    config = write_config(tmp_path / "agent.yaml", agent_settings(
        packages, mosquitto.url, tmp_path / "data", device, api=f"127.0.0.1:{api_port}"))
    client = EdgeClient(f"http://127.0.0.1:{api_port}", timeout_s=10)

    with Collector(mosquitto.url, device) as col, ServeProcess(mosquitto.url, packages.repo, env), \
            AgentProcess(config, tmp_path / "agent.log", env) as agent:
        col.wait_state(lambda s: s.online, what="the agent's online state")
        deployed = run_cli(["edgesdk", "deploy", packages.v1.pid, "--device", device, "--fleet", FLEET, "--allow-unknown",
                            "--repo", str(packages.repo), "--broker", mosquitto.url, "--rollout-id", "r-1"], env)
        assert deployed.returncode == 0, deployed.stderr

        activated = col.wait_event(K.ACTIVATED, packages.v1.pid)
        v1_events = [e for e in col.events if e.package_id == packages.v1.pid]
        kinds = [e.kind for e in v1_events]
        order = [K.DOWNLOADING, K.VERIFIED, K.SELECTED, K.ACTIVATED]
        assert [k for k in kinds if k in order] == sorted((k for k in kinds if k in order), key=order.index)
        assert set(order) <= set(kinds), kinds
        assert K.FAILED not in kinds
        assert all(e.rollout_id == "r-1" for e in v1_events)
        selected = col.of_kind(K.SELECTED, packages.v1.pid)[0]
        table = selected.table or []
        assert len(table) == len([p for v in packages.v1.manifest.variants for p in v.providers])
        assert {r["status"] for r in table} <= {"selected", "not_checked", "health_failed", "unavailable"}
        winner = [r for r in table if r["status"] == "selected"]
        assert len(winner) == 1 and winner[0]["p50_ms"] > 0
        variant = activated.extra["variant"]
        assert variant == winner[0]["variant"] == selected.extra["variant"]

        # /v1/infer answers exactly what one of v1's shipped variants answers on this host.
        for i in range(REQUESTS):
            feeds = sample_feeds(i)
            logits = client.infer(feeds)["logits"]
            assert logits.shape == refs.expected(packages.v1, feeds).shape
            assert refs.which(logits, feeds) == "v1"

        # Telemetry: every request is counted once, in windows numbered without gaps.
        col.wait_for(lambda c: sum(w.count for w in c.unique_windows().values()) >= REQUESTS,
                     what=f"telemetry counting {REQUESTS} requests")
        col.settle()
        windows = col.unique_windows()
        assert sum(w.count for w in windows.values()) == REQUESTS
        arrived = [w.seq for w in col.telemetry]
        assert arrived == sorted(arrived) and len(set(arrived)) == len(arrived)
        assert sorted(windows) == list(range(min(windows), max(windows) + 1))
        busy = [w for w in windows.values() if w.count]
        assert busy and all(w.package_id == packages.v1.pid and w.variant == variant and w.errors == 0
                            and w.p50_ms is not None and w.p50_ms > 0 for w in busy)
        assert not col.errors

        state = DeviceState.from_json(retained(mosquitto.url, device_topics(device)["state"]) or b"{}")
        assert state.online and state.active_package == packages.v1.pid and state.active_variant == variant

        status = run_cli(["edge-agent", "status", "--config", str(config)], env)
        assert status.returncode == 0, status.stderr
        assert f"mlp@1.0.0 active ({packages.v1.pid[:12]})" in status.stdout
        assert f"variant {variant}" in status.stdout

        before = len(col.states)
        assert agent.terminate() == 0, agent.log()[-2000:]
        col.wait_for(lambda c: any(not s.online for s in c.states[before:]), what="the offline state")
        assert "Traceback" not in agent.log()

    offline = DeviceState.from_json(retained(mosquitto.url, device_topics(device)["state"]) or b"{}")
    assert offline.online is False


def test_second_version_hot_swaps_under_load_and_keeps_previous(secure_mosquitto, packages: PackageSet,
                                                                refs: ReferenceModels, tmp_path: Path) -> None:
    mosquitto = secure(secure_mosquitto)
    device = new_device_id("swap")
    data_dir = seeded_data_dir(packages, tmp_path / "data")
    config = build_config(agent_settings(packages, mosquitto.url, data_dir, device), tmp_path)
    served: list[str | None] = []
    errors: list[str] = []
    stop = threading.Event()

    with Collector(mosquitto.url, device) as col, running_agent(config) as agent:
        client = EdgeClient(agent.api.url, timeout_s=10)

        def hammer() -> None:
            i = 0
            while not stop.is_set():
                feeds = sample_feeds(i % 8)
                i += 1
                try:
                    served.append(refs.which(client.infer(feeds)["logits"], feeds))
                except Exception as exc:  # any failed request is the bug this test is about
                    errors.append(f"{type(exc).__name__}: {exc}")

        with repository(mosquitto.url, packages.repo):
            col.wait_state(lambda s: s.online and s.active_package == packages.v1.pid, what="v1 online")
            worker = threading.Thread(target=hammer, daemon=True)
            worker.start()
            try:
                wait_until(lambda: len(served) >= 5, what="requests to v1")
                deploy(mosquitto.url, device, packages.v2)
                col.wait_event(K.DOWNLOADING, packages.v2.pid)
                during = len(served)
                col.wait_event(K.ACTIVATED, packages.v2.pid)
                assert len(served) > during, "no request completed while v2 was being installed"
                switched = len(served)
                wait_until(lambda: len(served) >= switched + 5, what="requests after the switch")
            finally:
                stop.set()
                worker.join(15)

        assert errors == []
        assert None not in served  # every answer was exactly v1's or v2's
        first_v2 = served.index("v2")
        assert set(served[:first_v2]) == {"v1"} and set(served[first_v2:]) == {"v2"}  # one switch, no flapping
        assert agent.store.active("mlp")["package_id"] == packages.v2.pid
        previous = agent.store.previous("mlp")
        assert previous is not None and previous["package_id"] == packages.v1.pid
        assert agent.store.has_version(packages.v1.pid)  # kept on disk for a rollback
        assert agent.status()["installs"]["mlp"]["active"]["version"] == "2.0.0"
        assert col.of_kind(K.FAILED) == []


def test_doctor_json_is_machine_readable(tmp_path: Path) -> None:
    result = run_cli(["edge-agent", "doctor", "--json"], subprocess_env(tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["hardware"]["arch"] == "x86_64"
    assert "CPUExecutionProvider" in report["hardware"]["providers"]["onnxruntime"]
    assert report["target"] == "x86-64-cpu"
