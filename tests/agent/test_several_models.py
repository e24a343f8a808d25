"""Several models on one device, against a real Mosquitto (TLS, ACL) and real agents: each model is
deployed, updated, rolled back and undeployed on its own, served by name, and never interrupted
by what happens to another.

The rig's device runs `mlp` v1; the second model is `det` (input [1, 32], output [1, 4]), so a
request that reached the wrong model would fail its shape check, and `refs.which` tells the
three packages' answers apart.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest

from agent.client import ApiError, EdgeClient
from agent.store import VersionStore
from edgesdk.protocol import InstallEventKind as K
from edgesdk.protocol import undeploy_statement
from tests.agent.agent_harness import (DET_MODEL, FLEET, MODEL, AgentProcess, Rig, deploy, det_feeds,
                                       publish_desired, repository, run_cli, running_agent, sample_feeds,
                                       subprocess_env, wait_until)


def _activated(rig: Rig, pkg, after: int = 0):  # noqa: ANN001, ANN202
    event = rig.col.wait_event(K.ACTIVATED, pkg.pid, after=after)
    assert event.model == pkg.manifest.name
    return event


def _deploy_det(rig: Rig, agent) -> None:  # noqa: ANN001
    deploy(rig.broker.url, rig.device, rig.packages.det)
    _activated(rig, rig.packages.det)
    rig.col.wait_state(lambda s: s.online and {m["name"] for m in s.models} == {MODEL, DET_MODEL},
                       what="both models in the device state")


class Load:
    """Threads calling one model by name until stopped; every answer is checked."""

    def __init__(self, url: str, model: str, feeds: Callable[[int], dict], expect: Callable[[dict, dict], bool],
                 threads: int = 3) -> None:
        self.url, self.model, self.feeds, self.expect = url, model, feeds, expect
        self.calls = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        client = EdgeClient(self.url, timeout_s=20)
        seed = index * 100_000
        while not self._stop.is_set():
            seed += 1
            feeds = self.feeds(seed)
            try:
                outputs = client.infer(feeds, model=self.model)
                ok = self.expect(outputs, feeds)
                problem = None if ok else f"wrong answer for seed {seed}"
            except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                problem = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.calls += 1
                if problem:
                    self.failures.append(problem)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        wait_until(lambda: self.calls >= 10, what=f"the first calls to {self.model}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_two_models_are_deployed_to_one_device_and_served_concurrently_by_name(rig: Rig) -> None:
    det = rig.packages.det
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        _deploy_det(rig, agent)

        # The det install was timed beside the running mlp, and says what that cost.
        selected = rig.col.wait_event(K.SELECTED, det.pid)
        assert selected.model == DET_MODEL and selected.extra["neighbours"] == [MODEL]
        timed = [row for row in selected.table if row["status"] in ("selected", "not_checked", "health_failed")]
        assert timed and all(row["p50_alone_ms"] > 0 and row["interference"] > 0 for row in timed)
        assert all(row["resident_mb"] > 0 for row in timed)

        with Load(agent.api.url, MODEL, sample_feeds, lambda out, f: rig.refs.which(out["logits"], f) == "v1") as a, \
                Load(agent.api.url, DET_MODEL, det_feeds, lambda out, f: rig.refs.which(out["logits"], f) == "det") as b:
            wait_until(lambda: a.calls >= 60 and b.calls >= 60, what="60 calls to each model")
        assert a.failures == [], a.failures[:2]
        assert b.failures == [], b.failures[:2]

        client = EdgeClient(agent.api.url)
        with pytest.raises(ApiError) as ambiguous:
            client.infer(sample_feeds(1))  # several models: a request must say which
        assert ambiguous.value.status == 409 and MODEL in str(ambiguous.value) and DET_MODEL in str(ambiguous.value)
        listed = {m["name"]: m for m in client.models()}
        assert set(listed) == {MODEL, DET_MODEL}
        assert listed[DET_MODEL]["version"] == "1.0.0" and listed[DET_MODEL]["package_id"] == det.pid
        assert listed[DET_MODEL]["inputs"][0]["shape"] == [1, 32]

        # One telemetry window per model, each naming its model and release.
        rig.col.wait_for(lambda c: {w.model for w in c.unique_windows().values() if w.count} >= {MODEL, DET_MODEL},
                         what="telemetry windows of both models")
        windows = [w for w in rig.col.unique_windows().values() if w.count]
        assert all(w.package_id == (det.pid if w.model == DET_MODEL else rig.packages.v1.pid) for w in windows)
        assert sum(w.count for w in windows if w.model == DET_MODEL) <= b.calls
        assert not rig.col.errors


def test_one_model_is_updated_and_rolled_back_while_the_other_serves_under_load(rig: Rig) -> None:
    v1, v2 = rig.packages.v1, rig.packages.v2
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        _deploy_det(rig, agent)
        det_record = agent.store.active(DET_MODEL)

        with Load(agent.api.url, DET_MODEL, det_feeds,
                  lambda out, f: rig.refs.which(out["logits"], f) == "det") as load:
            deploy(rig.broker.url, rig.device, v2)
            _activated(rig, v2)
            by_name = EdgeClient(agent.api.url).infer(sample_feeds(4), model=MODEL)["logits"]
            assert rig.refs.which(by_name, sample_feeds(4)) == "v2"
            events = len(rig.col.events)
            deploy(rig.broker.url, rig.device, v1, rollback=True)
            _activated(rig, v1, after=events)
            # A failing install of mlp (a package for an aarch64 board) does not touch det either.
            deploy(rig.broker.url, rig.device, rig.packages.arm)
            failed = rig.col.wait_event(K.FAILED, rig.packages.arm.pid)
            assert failed.model == MODEL and "aarch64" in failed.reason
            calls_during = load.calls
        assert load.failures == [], load.failures[:3]
        assert calls_during >= 20
        assert agent.store.active(DET_MODEL) == det_record  # det's record never moved
        assert agent.store.active(MODEL)["package_id"] == v1.pid
        assert agent.store.previous(MODEL)["package_id"] == v2.pid
        client = EdgeClient(agent.api.url)
        assert rig.refs.which(client.infer(sample_feeds(5), model=MODEL)["logits"], sample_feeds(5)) == "v1"
        det_events = [e for e in rig.col.events if e.model == DET_MODEL and e.kind != K.REFUSED]
        assert [e.kind for e in det_events].count(K.ACTIVATED) == 1  # the mlp installs never touched det


def test_an_install_past_the_memory_budget_is_refused_with_the_numbers(rig: Rig) -> None:
    det = rig.packages.det
    held = json.loads((rig.data_dir / "active.json").read_text())["models"][MODEL]["active"]["resident_mb"]
    assert held > 0
    budget = held + 0.001  # room for mlp, not for det (its files alone are more than 1 kB)
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config(memory_budget_mb=budget)) as agent:
        rig.wait_v1_online()
        deploy(rig.broker.url, rig.device, det)
        failed = rig.only_failure(det.pid)
        assert failed.model == DET_MODEL
        assert f"memory budget refused {DET_MODEL}@1.0.0" in failed.reason
        assert f"the budget is {budget:g} MB" in failed.reason and f"{MODEL} {held:.1f} MB" in failed.reason
        assert rig.col.of_kind(K.ACTIVATED) == []
        assert agent.host.get(DET_MODEL) is None and agent.store.active(DET_MODEL) is None
        assert rig.served(agent.api.url) == "v1"  # /v1/infer: still the one model, as before


def test_undeploy_unloads_one_model_keeps_its_files_for_the_grace_period_and_redeploys_without_download(
        rig: Rig) -> None:
    det = rig.packages.det
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        _deploy_det(rig, agent)
        events = len(rig.col.events)
        undeployed = run_cli(["edgesdk", "undeploy", DET_MODEL, "--device", rig.device, "--fleet", FLEET,
                              "--broker", rig.broker.url, "--fleet-key", str(rig.packages.fleet_keys.private_path),
                              "--wait", "20", "--allow-unknown"], subprocess_env(rig.tmp / "home", rig.broker.url))
        assert undeployed.returncode == 0, undeployed.stdout + undeployed.stderr
        assert "confirmed" in undeployed.stdout and "cleared" in undeployed.stdout
        # The operator cleared the retained statement once the device confirmed: the collector,
        # subscribed to desired/+, saw the signed undeploy statement and then the empty clear.
        rig.col.wait_for(lambda c: c.raw["desired"] and c.raw["desired"][-1] == b"", what="the statement cleared")
        done = rig.col.wait_event(K.UNDEPLOYED, after=events)
        assert done.model == DET_MODEL and done.package_id == det.pid and done.extra["removed"] == []
        rig.col.wait_state(lambda s: s.online and [m["name"] for m in s.models] == [MODEL], what="det gone from state")
        assert agent.host.get(DET_MODEL) is None and agent.store.names() == [MODEL]
        assert (rig.data_dir / "versions" / det.pid).is_dir()  # the grace period keeps its files
        client = EdgeClient(agent.api.url)
        with pytest.raises(ApiError) as gone:
            client.infer(det_feeds(1), model=DET_MODEL)
        assert gone.value.status == 404
        assert rig.served(agent.api.url) == "v1"  # one model again: /v1/infer serves it

        events = len(rig.col.events)
        deploy(rig.broker.url, rig.device, det)  # back within the grace period: no download
        _activated(rig, det, after=events)
        assert [e for e in rig.col.events[events:] if e.kind == K.DOWNLOADING] == []


def test_undeploy_with_no_grace_period_frees_the_disk_before_it_reports(rig: Rig) -> None:
    det = rig.packages.det
    with repository(rig.broker.url, rig.packages.repo), \
            running_agent(rig.config(undeploy_grace_s=0)) as agent:
        rig.wait_v1_online()
        _deploy_det(rig, agent)
        rig.publish_for(DET_MODEL, rig.packages.sign(undeploy_statement(FLEET, rig.device, DET_MODEL,
                                                                        _serial(), _now())))
        done = rig.col.wait_event(K.UNDEPLOYED)
        assert done.extra["removed"] == [det.pid]
        assert not (rig.data_dir / "versions" / det.pid).exists()
        assert VersionStore(rig.data_dir).installed() == [rig.packages.v1.pid]
        assert rig.served(agent.api.url) == "v1"


def test_agent_killed_during_one_models_install_leaves_the_other_untouched(rig: Rig) -> None:
    v1, det = rig.packages.v1, rig.packages.det
    mlp_record = json.loads((rig.data_dir / "active.json").read_text())["models"][MODEL]
    with repository(rig.broker.url, rig.packages.repo):
        config, env, url = rig.kill_during_install(det, K.SELECTED)  # SIGKILL in the middle of det's install
        assert json.loads((rig.data_dir / "active.json").read_text())["models"][MODEL] == mlp_record

        states = len(rig.col.states)
        with AgentProcess(config, rig.tmp / "agent-2.log", env) as second:
            back = rig.col.wait_for(lambda c: next((s for s in c.states[states:] if s.online), None),
                                    what="the restarted agent online")
            assert back.model(MODEL)["package_id"] == v1.pid  # mlp serves from the first moment
            client = EdgeClient(url)
            assert rig.refs.which(client.infer(sample_feeds(2), model=MODEL)["logits"], sample_feeds(2)) == "v1"
            rig.col.wait_for(lambda c: any(s.online and s.model(DET_MODEL) for s in c.states[states:]),
                             what="det active after the restart")
            assert rig.refs.which(client.infer(det_feeds(2), model=DET_MODEL)["logits"], det_feeds(2)) == "det"
            assert second.terminate() == 0
        assert "Traceback" not in second.log()
    assert json.loads((rig.data_dir / "active.json").read_text())["models"][MODEL] == mlp_record


# -- attacks on the per-model topics -----------------------------------------------------------------
def test_statement_misfiled_under_another_models_topic_is_refused(rig: Rig) -> None:
    """A det statement put on desired/mlp would hide mlp's real statement from devices that connect
    later: it is refused, and mlp keeps serving."""
    det = rig.packages.det
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        rig.publish_for(MODEL, rig.packages.sign(det.statement(rig.device)))
        refused = rig.col.wait_event(K.REFUSED)
        assert "misfiled statement refused" in refused.reason and refused.model == MODEL
        assert agent.host.get(DET_MODEL) is None
        rig.assert_v1_still_serving(agent)


def test_cleared_desired_message_does_not_unload_a_model(rig: Rig) -> None:
    """An empty retained message is unsigned: anyone who may write the topic could send it. Only a
    signed undeploy statement removes a model."""
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        publish_desired(rig.broker.url, rig.device, b"", name=MODEL)
        # Messages are handled in order: once this later garbage is refused, the clear was seen.
        publish_desired(rig.broker.url, rig.device, b"{not json", name="barrier")
        refused = rig.col.wait_event(K.REFUSED)
        assert refused.model == "barrier"
        rig.assert_v1_still_serving(agent)
        assert rig.col.of_kind(K.UNDEPLOYED) == []


def _serial() -> int:
    from edgesdk.fleet.deploy import next_serial

    return next_serial()


def _now() -> float:
    return time.time()
