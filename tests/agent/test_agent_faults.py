"""Faults injected for real against a running agent that already serves v1: a hostile or broken
deployment, a broker that is down or killed, an agent SIGKILLed mid-install. Each asserts what
survived: v1 keeps answering /v1/infer, and the failure is one `failed` event with a clear reason."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import EdgeClient
from agent.store import VersionStore
from agent.daemon import broker_config_of
from edgesdk.protocol import InstallEventKind as K
from edgesdk.runtime import open_session
from tests.agent.agent_harness import (
    AgentProcess, Rig, deploy, publish_desired, repository, running_agent, sample_feeds, subprocess_env, wait_until,
    write_config,
)
from tests.fixtures.broker import free_port


# -- a bad deployment ------------------------------------------------------------------------------
def test_rejects_package_signed_by_unknown_key(rig: Rig) -> None:
    rogue = rig.packages.untrusted
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        deploy(rig.broker.url, rig.device, rogue)
        failed = rig.only_failure(rogue.pid)
        assert "signature does not match any trusted key" in failed.reason
        assert rig.col.of_kind(K.VERIFIED) == []
        rig.assert_v1_still_serving(agent)
        assert not agent.store.has_version(rogue.pid)  # nothing of it was extracted
        assert not any(rogue.pid in p.name for p in (rig.data_dir / "versions").iterdir())


def test_ignores_desired_message_that_is_not_json(rig: Rig) -> None:
    with running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        publish_desired(rig.broker.url, rig.device, b"{this is not json")
        refused = rig.col.wait_event(K.REFUSED, "")
        assert "not valid JSON" in refused.reason and "desired" in refused.reason
        rig.assert_v1_still_serving(agent)
        assert agent.installer.last_error == {}  # nothing was attempted


def test_reports_package_missing_from_repository(rig: Rig) -> None:
    missing_id = hashlib.sha256(b"never published").hexdigest()
    statement = dataclasses.replace(rig.packages.v2.statement(rig.device), package_id=missing_id)
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config(stall_timeout_s=2)) as agent:
        rig.wait_v1_online()
        publish_desired(rig.broker.url, rig.device, rig.packages.sign(statement).to_json())
        failed = rig.only_failure(missing_id)
        # The repository answers NOT_FOUND; the fetcher gives up on that or on the stall timeout.
        assert "no such package" in failed.reason or "stalled" in failed.reason, failed.reason
        assert missing_id[:12] in failed.reason
        rig.assert_v1_still_serving(agent)


def test_rejects_package_for_another_target_when_configured(rig: Rig) -> None:
    arm = rig.packages.arm
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config(target="x86-64-cpu")) as agent:
        rig.wait_v1_online()
        deploy(rig.broker.url, rig.device, arm)
        failed = rig.only_failure(arm.pid)
        assert "acme-arm-board" in failed.reason and "x86-64-cpu" in failed.reason
        assert rig.col.of_kind(K.SELECTED) == []
        rig.assert_v1_still_serving(agent)


def test_rejects_aarch64_package_from_user_profile_without_configured_target(rig: Rig) -> None:
    arm = rig.packages.arm
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        deploy(rig.broker.url, rig.device, arm)
        done = rig.col.wait_for(lambda c: c.of_kind(K.FAILED, arm.pid) or c.of_kind(K.ACTIVATED, arm.pid),
                                what="the end of the arm install")
        assert done[0].kind == K.FAILED and "aarch64" in (done[0].reason or "")
        rig.assert_v1_still_serving(agent)


class NegatedOutputs:
    """A runtime that loads and runs but computes garbage: every output negated."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.input_names, self.output_names = session.input_names, session.output_names

    def run(self, feeds: Any) -> dict[str, np.ndarray]:
        return {name: -value for name, value in self._session.run(feeds).items()}

    def close(self) -> None:
        self._session.close()


def test_keeps_previous_when_every_candidate_fails_health_check(rig: Rig) -> None:
    v2 = rig.packages.v2

    def factory(path: Path, runtime: str, provider: str, options: Any = None, threads: Any = None) -> Any:
        session = open_session(path, runtime, provider, options=options, threads=threads)
        return NegatedOutputs(session) if v2.pid in Path(path).parts else session

    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config(), session_factory=factory) as agent:
        rig.wait_v1_online()
        deploy(rig.broker.url, rig.device, v2)
        failed = rig.only_failure(v2.pid)
        assert "no candidate passed the health check" in failed.reason
        for variant in v2.manifest.variants:
            assert f"{variant.id}@" in failed.reason
        assert rig.col.of_kind(K.SELECTED, v2.pid) == []
        rig.assert_v1_still_serving(agent)
        assert agent.store.previous("mlp") is None  # v1 was not demoted, not even for a moment


# -- the broker ------------------------------------------------------------------------------------
def test_serves_while_broker_down_at_start_then_installs_desired(rig: Rig) -> None:
    rig.persist_broker_state()
    # stall_timeout_s above the fetcher's 5 s request timeout: a block request sent before the
    # repository has re-subscribed is re-issued, not counted as a stall. (Made first: it
    # provisions the device's login, which needs the broker running.)
    config = rig.config(stall_timeout_s=8)
    deploy(rig.broker.url, rig.device, rig.packages.v2)  # retained: waits for the device
    rig.broker.stop()  # a clean stop: the retained desired is kept for the broker's return
    with running_agent(config, broker=broker_config_of(config).with_timeouts(reconnect_min_s=0.2,
                                                                           reconnect_max_s=0.5)) as agent:
        assert rig.served(agent.api.url) == "v1"  # the API is up and serving with no broker at all
        assert not agent.connected.is_set()
        rig.broker.start()
        with repository(rig.broker.url, rig.packages.repo):
            rig.col.wait_event(K.ACTIVATED, rig.packages.v2.pid)
            assert rig.served(agent.api.url) == "v2"
        assert agent.store.previous("mlp")["package_id"] == rig.packages.v1.pid
        assert rig.col.of_kind(K.FAILED) == []


def test_telemetry_survives_broker_outage_without_gaps(rig: Rig) -> None:
    rig.persist_broker_state()
    with running_agent(rig.config()) as agent:
        client = EdgeClient(agent.api.url, timeout_s=10)
        rig.wait_v1_online()
        made = 0
        for i in range(5):
            client.infer(sample_feeds(i))
            made += 1
        rig.col.wait_for(lambda c: sum(w.count for w in c.unique_windows().values()) >= made,
                         what="the first requests counted")

        rig.broker.kill()
        wait_until(lambda: not agent.connected.is_set(), what="the agent to notice the broker is gone")
        first_offline = agent.recorder.next_seq
        for i in range(7):
            client.infer(sample_feeds(i))  # the API does not need the broker
            made += 1
        # Three windows closed while the broker is away, held in the on-disk spool (not lost).
        wait_until(lambda: len([seq for seq in agent.spool.pending() if seq >= first_offline]) >= 3,
                   what="three windows spooled while offline")
        rig.broker.start()
        for i in range(4):
            client.infer(sample_feeds(i))
            made += 1

        rig.col.wait_for(lambda c: sum(w.count for w in c.unique_windows().values()) >= made,
                         what=f"all {made} requests counted")
        rig.col.settle()
        windows = rig.col.unique_windows()
        assert sum(w.count for w in windows.values()) == made
        assert sorted(windows) == list(range(min(windows), max(windows) + 1)), "a window is missing"
        assert {first_offline, first_offline + 1, first_offline + 2} <= set(windows)
        assert all(w.dropped_windows == 0 and w.errors == 0 for w in windows.values())


# -- the agent process -----------------------------------------------------------------------------
@pytest.mark.parametrize("kill_at", [K.DOWNLOADING, K.SELECTED])
def test_agent_killed_during_install_restarts_serving_and_completes(rig: Rig, kill_at: K) -> None:
    v1, v2 = rig.packages.v1, rig.packages.v2
    with repository(rig.broker.url, rig.packages.repo):
        config, env, url = rig.kill_during_install(v2, kill_at)
        states = len(rig.col.states)
        with AgentProcess(config, rig.tmp / "agent-2.log", env) as second:
            back = rig.col.wait_for(lambda c: next((s for s in c.states[states:] if s.online), None),
                                    what="the restarted agent online")
            # Never broken: the moment it is back it serves the old version or the new one.
            assert back.active_package in (v1.pid, v2.pid)
            assert rig.served(url) in ("v1", "v2")
            rig.col.wait_for(lambda c: any(s.online and s.active_package == v2.pid for s in c.states[states:]),
                             what="v2 active after the restart")
            assert rig.served(url) == "v2"
            assert second.terminate() == 0
        assert "Traceback" not in second.log()

    store = VersionStore(rig.data_dir)
    assert store.active("mlp")["package_id"] == v2.pid
    assert store.previous("mlp")["package_id"] == v1.pid
    assert store.has_version(v1.pid) and store.has_version(v2.pid)
    leftovers = [p.name for p in (rig.data_dir / "versions").iterdir() if p.name.endswith(".partial")
                 or p.name.startswith(".trash-")]
    assert leftovers == []
    # Start-up reports the crash's leftovers it removed as `failed` (installer.restore); nothing else failed.
    others = [e for e in rig.col.of_kind(K.FAILED) if not (e.reason or "").startswith("removed unfinished ")]
    assert others == [], rig.col.describe_events()


def test_agent_killed_mid_download_resumes_after_restart(rig: Rig) -> None:
    """SIGKILL while blocks are arriving (a rate-limited repository with 16 KiB blocks makes the
    download last seconds): the restarted agent serves v1 at once, finishes the download and
    activates v2, and leaves no download files behind."""
    from edgesdk.fleet.deploy import next_serial
    from edgesdk.fleet.repository import RepositoryServer, publish_package
    from tests.agent.agent_harness import FLEET, fast_broker

    v2 = rig.packages.v2
    repo = rig.tmp / "slow-repo"
    slow_v2 = publish_package(v2.path, repo, block_size=16 * 1024)
    api_port = free_port()
    config = write_config(rig.tmp / "agent.yaml", rig.settings(api=f"127.0.0.1:{api_port}", stall_timeout_s=10))
    env = subprocess_env(rig.tmp / "home", rig.broker.url)
    slow = dict(bytes_per_s=96 * 1024, burst_bytes=32 * 1024, blocks_per_s=64, burst_blocks=4, max_delay_s=0.5)
    with RepositoryServer(fast_broker(rig.broker.url), FLEET, repo, share_group=rig.broker.share_group, **slow):
        with AgentProcess(config, rig.tmp / "agent-1.log", env) as first:
            rig.wait_v1_online()
            rig.publish(rig.packages.sign(slow_v2.statement(FLEET, rig.device, next_serial())))
            rig.col.wait_for(lambda c: any(e.kind == K.DOWNLOADING and 0.2 <= (e.progress or 0) < 1
                                           for e in c.events), what="the download under way")
            first.kill()
            assert rig.col.of_kind(K.DOWNLOADED, v2.pid) == [], "the download finished before the kill"
        assert list((rig.data_dir / "downloads").glob(f"{v2.pid}.part")), "no partial download to resume"
        states = len(rig.col.states)
        with AgentProcess(config, rig.tmp / "agent-2.log", env) as second:
            rig.col.wait_for(lambda c: any(s.online for s in c.states[states:]), what="the restarted agent")
            assert rig.served(f"http://127.0.0.1:{api_port}") == "v1"
            rig.col.wait_event(K.ACTIVATED, v2.pid)
            assert rig.served(f"http://127.0.0.1:{api_port}") == "v2"
            assert second.terminate() == 0
    assert not any((rig.data_dir / "downloads").iterdir()), "download files left behind"


def test_stalled_download_is_retried_when_the_repository_returns(rig: Rig) -> None:
    v2 = rig.packages.v2
    with running_agent(rig.config(stall_timeout_s=1), retry_delays=(0.5, 1.0)) as agent:
        rig.wait_v1_online()
        deploy(rig.broker.url, rig.device, v2)  # no repository is running: the transfer stalls
        failed = rig.col.wait_event(K.FAILED, v2.pid)
        assert "stalled" in failed.reason and failed.extra.get("retry") is True
        rig.assert_v1_still_serving(agent)
        with repository(rig.broker.url, rig.packages.repo):  # it comes back: the agent retries by itself
            rig.col.wait_event(K.ACTIVATED, v2.pid)
        assert rig.served(agent.api.url) == "v2"
