"""`edgesdk rollout start|status|list|pause|resume|abort` and the staged `edgesdk rollback`: rollouts
stored in the fleet store and run by the controller in `edgesdk serve --fleet-key` (docs/rollouts.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from edgesdk.cli.broker_options import B, broker_config
from edgesdk.cli.common import console, handle_errors, out, plain_table, print_json
from edgesdk.cli.deploy_cmd import fleet_key_option
from edgesdk.cli.devices_cmd import open_store, store_option
from edgesdk.errors import ConfigError

HALTED_EXIT = 4  # `rollout start --wait` / `rollout status`: the rollout halted or was aborted
NO_CONTROLLER_HINT_S = 30.0  # --wait: say so when no controller picked the rollout up by then

app = typer.Typer(help="Staged rollouts: waves, bake, gates on model metrics, automatic rollback.",
                  no_args_is_help=True)

_GATE_HELP = "(a percentage like 20%, a fraction like 0.2, or off)"
# The options `rollout start` and the staged `rollback` share.
O = dict(
    fleet=typer.Option("default", "--fleet", help="Fleet name."),
    select=typer.Option([], "--select", help="key=value: only devices with this label (repeatable)."),
    device=typer.Option([], "--device", help="Only this device (repeatable; with --select: must match it too)."),
    waves=typer.Option("1,10%,50%,100%", "--waves", help="Cumulative wave sizes: device counts or shares of the "
                       "selected devices; the last is 100%."),
    bake=typer.Option("10m", "--bake", help="How long each wave runs before its gates are judged (90s, 10m, 1h)."),
    activation_timeout=typer.Option("15m", "--activation-timeout", help="A device that has not activated by "
                                    "then counts as failed (offline ones as unknown)."),
    max_failure_rate=typer.Option(None, "--max-failure-rate", help=f"Installs/health checks failing in a wave "
                                  f"(default 5%) {_GATE_HELP}."),
    max_p95_regression=typer.Option(None, "--max-p95-regression", help=f"p95 slower than the baseline, per "
                                    f"hardware class (default 20%) {_GATE_HELP}."),
    max_p99_regression=typer.Option(None, "--max-p99-regression", help=f"p99 likewise (default 30%) {_GATE_HELP}."),
    max_error_rate_rise=typer.Option(None, "--max-error-rate-rise", help=f"Error rate above the baseline's, in "
                                     f"points (default 1%) {_GATE_HELP}."),
    max_drift=typer.Option(None, "--max-drift", help="Output drift: population stability index of the outputs, "
                           "new vs old on the same devices (default 0.2; or off)."),
    allow_fallback=typer.Option(False, "--allow-provider-fallback", help="Do not halt when a device runs the new "
                                "release on a slower execution provider than the old one."),
    min_samples=typer.Option(500, "--min-samples", min=1, help="Calls per side (and hardware class) before a "
                             "latency, error or drift verdict."),
    max_wait=typer.Option(None, "--max-wait", help="After the bake, how long to wait for --min-samples before "
                          "halting as inconclusive (default: twice --bake, at least 60s)."),
    wait=typer.Option(False, "--wait", help="Follow the rollout to its end; exit 4 when it halted."),
    as_json=typer.Option(False, "--json", help="Machine-readable output (docs/cli-json.md)."),
)


def _spec(kind: str, name: str, version: str, fleet: str, select: list[str], device: list[str], waves: str,
          bake: str, activation_timeout: str, max_failure_rate: str | None, max_p95_regression: str | None,
          max_p99_regression: str | None, max_error_rate_rise: str | None, max_drift: str | None,
          allow_fallback: bool, min_samples: int, max_wait: str | None):
    from edgesdk import protocol
    from edgesdk.fleet.deploy import check_model_name
    from edgesdk.fleet.report import parse_select
    from edgesdk.fleet.rollout_spec import (GateLimits, RolloutSpec, parse_duration, parse_limit, parse_waves)

    check_model_name(name)
    protocol.check_id(fleet, "--fleet")
    for d in device:
        protocol.check_id(d, "--device")
    defaults = GateLimits()
    limits = GateLimits(
        max_failure_rate=parse_limit(max_failure_rate, "--max-failure-rate", defaults.max_failure_rate),
        max_p95_regression=parse_limit(max_p95_regression, "--max-p95-regression", defaults.max_p95_regression),
        max_p99_regression=parse_limit(max_p99_regression, "--max-p99-regression", defaults.max_p99_regression),
        max_error_rate_rise=parse_limit(max_error_rate_rise, "--max-error-rate-rise", defaults.max_error_rate_rise),
        max_drift=parse_limit(max_drift, "--max-drift", defaults.max_drift, fraction=False),
        provider_fallback=not allow_fallback, min_samples=min_samples)
    return RolloutSpec(fleet=fleet, name=name, version=version, kind=kind, select=parse_select(select),
                       devices=tuple(device), waves=parse_waves(waves), bake_s=parse_duration(bake, "--bake"),
                       activation_timeout_s=parse_duration(activation_timeout, "--activation-timeout"),
                       max_wait_s=None if max_wait is None else parse_duration(max_wait, "--max-wait"), limits=limits)


def _split_release(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise ConfigError(f"{ref!r}: name the release as NAME@VERSION, e.g. det@2.0.0")
    return name, version


@app.command("start")
@handle_errors
def start(
    release: str = typer.Argument(..., help="The release to roll out, NAME@VERSION (published: `releases list`)."),
    fleet: str = O["fleet"], select: list[str] = O["select"], device: list[str] = O["device"],
    waves: str = O["waves"], bake: str = O["bake"], activation_timeout: str = O["activation_timeout"],
    max_failure_rate: str = O["max_failure_rate"], max_p95_regression: str = O["max_p95_regression"],
    max_p99_regression: str = O["max_p99_regression"], max_error_rate_rise: str = O["max_error_rate_rise"],
    max_drift: str = O["max_drift"], allow_fallback: bool = O["allow_fallback"], min_samples: int = O["min_samples"],
    max_wait: str = O["max_wait"],
    max_metric_drop: str = typer.Option("1", "--max-metric-drop", help="Refuse a release whose packaged task "
                                        "metric is more than this many points below the release it replaces "
                                        "(a point: 0.01 of a 0..1 score; or off)."),
    force: bool = typer.Option(False, "--force", help="Start even though the release gate refused."),
    wait: bool = O["wait"], as_json: bool = O["as_json"], store: str = store_option(),
) -> None:
    """Roll NAME@VERSION out in waves; each wave bakes, then its gates decide (failure rate, p95/p99
    regression per hardware class, error rate, provider fallback, output drift). A failed gate
    halts the rollout and rolls every touched device back. The controller in `edgesdk serve
    --fleet-key` runs it; this command stores it and prints its id."""
    name, version = _split_release(release)
    spec = _spec("deploy", name, version, fleet, select, device, waves, bake, activation_timeout, max_failure_rate,
                 max_p95_regression, max_p99_regression, max_error_rate_rise, max_drift, allow_fallback,
                 min_samples, max_wait)
    drop = _metric_drop(max_metric_drop)
    _create_and_follow(spec, store, drop, force, wait, as_json)


def rollback(
    name: str = typer.Argument(..., help="The model name to roll back."),
    to: str = typer.Option(..., "--to", help="The version to go back to (published)."),
    fleet: str = O["fleet"], select: list[str] = O["select"], device: list[str] = O["device"],
    waves: str = typer.Option("1,100%", "--waves", help="Cumulative wave sizes (default: one device, then all)."),
    bake: str = typer.Option("2m", "--bake", help="How long each wave runs before its gates are judged."),
    activation_timeout: str = O["activation_timeout"],
    max_failure_rate: str = O["max_failure_rate"], max_p95_regression: str = O["max_p95_regression"],
    max_p99_regression: str = O["max_p99_regression"], max_error_rate_rise: str = O["max_error_rate_rise"],
    max_drift: str = typer.Option("off", "--max-drift", help="Output drift gate (default off for a rollback: the "
                                  "outputs are expected to change back)."),
    allow_fallback: bool = O["allow_fallback"], min_samples: int = O["min_samples"], max_wait: str = O["max_wait"],
    immediate: bool = typer.Option(False, "--immediate", help="No rollout: publish the rollback statements to "
                                   "--device now (needs --repo; the fleet store need not know the devices)."),
    repo: Path = typer.Option(None, "--repo", help="With --immediate: the package repository folder."),
    target: str = typer.Option(None, "--target", help="With --immediate: the target, when several are published."),
    rollout_id: str = typer.Option(None, "--rollout-id", help="With --immediate: id carried into the events."),
    fleet_key: Path = fleet_key_option(),
    release_key_as_fleet_key: bool = typer.Option(False, "--release-key-as-fleet-key", help="With --immediate: "
                                                  "allow the key that signed the package to sign the statement."),
    allow_unknown: bool = typer.Option(False, "--allow-unknown", help="With --immediate: send to devices the "
                                       "fleet store does not know."),
    wait: bool = O["wait"], as_json: bool = O["as_json"], store: str = store_option(),
    broker: str = B["broker"], ca: Path = B["ca"], cert: Path = B["cert"], client_key: Path = B["client_key"],
    username: str = B["username"], password: str = B["password"], password_file: Path = B["password_file"],
) -> None:
    """Put devices back on NAME@VERSION: a staged rollout of signed rollback statements (the only
    way a device installs a lower version), with the same gates as `rollout start`; --immediate
    publishes them to --device at once instead."""
    if immediate:
        from edgesdk.cli.deploy_cmd import send_statements

        if not device or repo is None:
            raise ConfigError("--immediate needs --device (repeatable) and --repo")
        config = broker_config(broker, ca, cert, client_key, username, password, password_file)
        send_statements(f"{name}@{to}", device, fleet, repo, target, rollout_id, fleet_key, release_key_as_fleet_key,
                        config, rollback=True, store=store, allow_unknown=allow_unknown)
        return
    spec = _spec("rollback", name, to, fleet, select, device, waves, bake, activation_timeout, max_failure_rate,
                 max_p95_regression, max_p99_regression, max_error_rate_rise, max_drift, allow_fallback,
                 min_samples, max_wait)
    _create_and_follow(spec, store, None, False, wait, as_json)


def _metric_drop(text: str) -> float | None:
    from edgesdk.fleet.rollout_spec import parse_limit

    return parse_limit(text, "--max-metric-drop", 1.0, fraction=False)


def _create_and_follow(spec, store: str | None, max_drop: float | None, force: bool, wait: bool,  # noqa: ANN001
                       as_json: bool) -> None:
    from edgesdk.fleet.rollout_plan import plan_rollout
    from edgesdk.fleet.rollouts import create_rollout, new_rollout_id

    rollout_id = new_rollout_id()
    with open_store(store) as fleet_store:
        plan = plan_rollout(fleet_store, spec, rollout_id=rollout_id, max_metric_drop=max_drop, force=force)
        rollout = create_rollout(fleet_store, spec, plan.devices, plan.sizes, rollout_id=rollout_id)
        if not as_json:
            what = "rollback to" if spec.kind == "rollback" else "rollout of"
            console.print(f"{plan.gate}", markup=False)
            out.print(rollout.id, markup=False)
            console.print(f"{what} {spec.release}: {len(plan.devices)} devices in {len(plan.sizes)} waves "
                          f"({', '.join(map(str, plan.sizes))}); bake {spec.bake_s:g} s — run by the controller "
                          "of `edgesdk serve --fleet-key`", markup=False)
        if not wait:
            if as_json:
                print_json(_status_json(fleet_store, rollout.id))
            return
        final = _follow(fleet_store, rollout.id, as_json)
    if final.state != "completed":
        raise typer.Exit(HALTED_EXIT)


def _follow(fleet_store, rollout_id: str, as_json: bool):  # noqa: ANN001, ANN202
    """Print each change of wave, phase and state until the rollout ends; its last record."""
    from edgesdk.fleet.rollouts import get_rollout, rollout_devices

    shown, started = None, time.monotonic()
    hinted = False
    while True:
        rollout = get_rollout(fleet_store, rollout_id)
        assert rollout is not None
        key = (rollout.state, rollout.phase, rollout.wave)
        if key != shown and not as_json:
            counts = _counts(rollout_devices(fleet_store, rollout.id))
            console.print(f"{time.strftime('%H:%M:%S')} wave {min(rollout.wave + 1, rollout.waves)}/{rollout.waves} "
                          f"{rollout.phase if not rollout.final else rollout.state}: {counts}", markup=False)
            shown = key
        if rollout.final:
            if as_json:
                print_json(_status_json(fleet_store, rollout.id))
            else:
                outcome = _text(rollout.outcome, 600)
                console.print(outcome if outcome.startswith(rollout.state) else f"{rollout.state}: {outcome}",
                              markup=False, emoji=False)
            return rollout
        if rollout.lease_owner is None and not hinted and time.monotonic() - started > NO_CONTROLLER_HINT_S:
            console.print("no controller has picked this rollout up yet: is `edgesdk serve --fleet-key … --store` "
                          "running on this fleet store?", markup=False)
            hinted = True
        time.sleep(1.0)  # polling the store: the controller is another process


def _counts(devices) -> str:  # noqa: ANN001
    from edgesdk.fleet.rollouts import count_states

    counts = count_states(devices)
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no devices"


# -- status, list, pause/resume/abort --------------------------------------------------------------
@app.command("status")
@handle_errors
def status(
    rollout_id: str = typer.Argument(None, help="Rollout id or a unique prefix (default: the latest of --fleet)."),
    fleet: str = O["fleet"], as_json: bool = O["as_json"],
    devices: bool = typer.Option(False, "--devices", help="List every device with its state."),
    store: str = store_option(),
) -> None:
    """Waves, devices per state, and each gate's decision with its evidence (the numbers, sample
    counts and cohorts compared). Exits 4 when the rollout halted or was aborted."""
    with open_store(store) as fleet_store:
        rollout = _find(fleet_store, rollout_id, fleet)
        if as_json:
            print_json(_status_json(fleet_store, rollout.id))
        else:
            out.print(_status_text(fleet_store, rollout.id, devices), markup=False, highlight=False, emoji=False)
    if rollout.state in ("halted", "aborted"):
        raise typer.Exit(HALTED_EXIT)


def _find(fleet_store, rollout_id: str | None, fleet: str):  # noqa: ANN001, ANN202
    """The rollout ``rollout_id`` names (an id or a unique prefix), or the latest of ``fleet``."""
    from edgesdk.fleet.rollouts import get_rollout, list_rollouts

    if rollout_id is None:
        latest = list_rollouts(fleet_store, fleet, limit=1)
        if not latest:
            raise ConfigError(f"no rollout in fleet {fleet} yet (`edgesdk rollout start NAME@VERSION`)")
        return latest[0]
    found = get_rollout(fleet_store, rollout_id)
    if found is None:
        raise ConfigError(f"no rollout {rollout_id!r} (see `edgesdk rollout list`)")
    return found


@app.command("list")
@handle_errors
def list_cmd(
    fleet: str = typer.Option(None, "--fleet", help="Only this fleet (default: all)."),
    as_json: bool = O["as_json"], store: str = store_option(),
) -> None:
    """Rollouts, newest first: release, state, wave, devices, outcome."""
    from edgesdk.fleet.report import fmt_time
    from edgesdk.fleet.rollouts import list_rollouts, rollout_devices

    with open_store(store) as fleet_store:
        rollouts = list_rollouts(fleet_store, fleet)
        rows = [(r, rollout_devices(fleet_store, r.id)) for r in rollouts]
    if as_json:
        print_json({"rollouts": [_rollout_json(r, len(devs)) for r, devs in rows]})
        return
    if not rows:
        console.print("no rollouts yet (`edgesdk rollout start NAME@VERSION`)", markup=False)
        return
    out.print(plain_table(["ID", "RELEASE", "KIND", "STATE", "WAVE", "DEVICES", "STARTED", "OUTCOME"], [
        [r.id, r.release, r.kind, r.state + (" (paused)" if r.paused else ""), f"{min(r.wave + 1, r.waves)}/{r.waves}",
         str(len(devs)), fmt_time(r.created_at), _text(r.outcome, 600)] for r, devs in rows], {"OUTCOME": 70}),
        markup=False, highlight=False, emoji=False)


def _request(rollout_id: str, store: str | None, verb: str, **kwargs: Any) -> None:
    from edgesdk.fleet.rollouts import request

    with open_store(store) as fleet_store:
        rollout = request(fleet_store, rollout_id, **kwargs)
    out.print(f"{rollout.id}: {verb} (the controller acts on it within a second or two)", markup=False)


@app.command("pause")
@handle_errors
def pause(rollout_id: str = typer.Argument(..., help="Rollout id or unique prefix."), store: str = store_option()) -> None:
    """Send no further wave (devices already told keep their statement) until `rollout resume`."""
    _request(rollout_id, store, "pause requested", paused=True)


@app.command("resume")
@handle_errors
def resume(rollout_id: str = typer.Argument(..., help="Rollout id or unique prefix."),
           store: str = store_option()) -> None:
    """Continue a paused rollout where it stopped."""
    _request(rollout_id, store, "resume requested", paused=False)


@app.command("abort")
@handle_errors
def abort(rollout_id: str = typer.Argument(..., help="Rollout id or unique prefix."), store: str = store_option()) -> None:
    """Stop the rollout and roll every device it touched back to the release it ran before."""
    _request(rollout_id, store, "abort requested: touched devices will be rolled back", abort=True)


# -- rendering -------------------------------------------------------------------------------------
def _rollout_json(r, devices: int) -> dict[str, Any]:  # noqa: ANN001
    return {"id": r.id, "fleet": r.fleet, "release": r.release, "kind": r.kind, "state": r.state, "phase": r.phase,
            "wave": r.wave + 1, "waves": r.waves, "paused": r.paused, "devices": devices, "created_at": r.created_at,
            "finished_at": r.finished_at, "outcome": r.outcome}


def _status_json(fleet_store, rollout_id: str) -> dict[str, Any]:  # noqa: ANN001
    from edgesdk.fleet.rollouts import count_states, decisions, get_rollout, rollout_devices, rollout_waves

    r = get_rollout(fleet_store, rollout_id)
    assert r is not None
    devs = rollout_devices(fleet_store, r.id)
    data = _rollout_json(r, len(devs))
    data["spec"] = r.spec.to_dict()
    data["counts"] = count_states(devs)
    data["waves_detail"] = [{"wave": w.wave + 1, "size": w.size, "sent_at": w.sent_at, "settled_at": w.settled_at,
                             "evaluated_at": w.evaluated_at, "verdict": w.verdict,
                             "counts": count_states([d for d in devs if d.wave == w.wave])}
                            for w in rollout_waves(fleet_store, r.id)]
    data["decisions"] = [{"wave": d.wave + 1, "at": d.at, "gate": d.gate, "verdict": d.verdict, "summary": d.summary,
                          "evidence": d.evidence} for d in decisions(fleet_store, r.id)]
    data["device_states"] = [{"device": d.device_id, "wave": d.wave + 1, "hardware_class": d.hardware_class,
                              "state": d.state, "previous": d.prev_version, "prev_provider": d.prev_provider,
                              "new_provider": d.new_provider, "reason": d.reason} for d in devs]
    return data


def _status_text(fleet_store, rollout_id: str, with_devices: bool) -> str:  # noqa: ANN001
    from edgesdk.fleet.report import fmt_time
    from edgesdk.fleet.rollout_spec import describe_limit
    from edgesdk.fleet.rollouts import decisions, get_rollout, rollout_devices, rollout_waves

    r = get_rollout(fleet_store, rollout_id)
    assert r is not None
    devs = rollout_devices(fleet_store, r.id)
    lim = r.spec.limits
    lines = [f"rollout {r.id}: {r.kind} {r.release} in fleet {r.fleet}",
             f"state     {r.state}{' (paused)' if r.paused else ''}"
             + ("" if r.final else f", wave {r.wave + 1}/{r.waves} {r.phase} since {fmt_time(r.phase_at)}"),
             f"started   {fmt_time(r.created_at)}" + (f", ended {fmt_time(r.finished_at)}" if r.finished_at else ""),
             f"gates     failures ≤ {describe_limit(lim.max_failure_rate)}, p95 ≤ +{describe_limit(lim.max_p95_regression)}, "
             f"p99 ≤ +{describe_limit(lim.max_p99_regression)}, errors ≤ +{describe_limit(lim.max_error_rate_rise)}, "
             f"drift PSI ≤ {describe_limit(lim.max_drift, percent=False)}, provider fallback "
             f"{'halts' if lim.provider_fallback else 'allowed'}; {lim.min_samples} calls per side; bake "
             f"{r.spec.bake_s:g} s",
             f"devices   {_counts(devs)}"]
    if r.outcome:
        lines.append(f"outcome   {_text(r.outcome, 600)}")
    lines.append("")
    lines.append(plain_table(["WAVE", "SIZE", "SENT", "SETTLED", "EVALUATED", "VERDICT", "DEVICES"], [
        [str(w.wave + 1), str(w.size), fmt_time(w.sent_at), fmt_time(w.settled_at), fmt_time(w.evaluated_at),
         w.verdict or "—", _counts([d for d in devs if d.wave == w.wave]) if w.sent_at else "—"]
        for w in rollout_waves(fleet_store, r.id)]))
    latest: dict[tuple[int, str], Any] = {}
    for d in decisions(fleet_store, r.id):
        latest[(d.wave, d.gate)] = d
    if latest:
        lines.append("")
        lines.append(plain_table(["WAVE", "GATE", "VERDICT", "EVIDENCE"], [
            [str(d.wave + 1), d.gate, d.verdict, _text(d.summary, 400)] for (_, _), d in sorted(latest.items())],
            {"EVIDENCE": 110}))
        lines.extend(_class_lines(latest))
    if with_devices:
        lines.append("")
        lines.append(plain_table(["DEVICE", "WAVE", "CLASS", "STATE", "BEFORE", "PROVIDER", "REASON"], [
            [_text(d.device_id), str(d.wave + 1), _text(d.hardware_class), d.state, _text(d.prev_version),
             f"{_text(d.prev_provider)} -> {_text(d.new_provider)}", _text(d.reason, 300) if d.reason else ""]
            for d in devs], {"REASON": 60}))
    return "\n".join(lines)


def _class_lines(latest: dict) -> list[str]:
    """The latency evidence per hardware class of the latest wave judged: the cohorts compared."""
    rows = []
    for (wave, gate), d in sorted(latest.items()):
        if gate != "p95-regression":
            continue
        for hw, entry in sorted((d.evidence.get("classes") or {}).items()):
            new, old, untouched = entry.get("new", {}), entry.get("same_devices_old", {}), entry.get("untouched", {})
            rows.append([str(wave + 1), _text(hw), _cohort(new), _cohort(old), _cohort(untouched),
                         _text(entry.get("verdict"))])
    if not rows:
        return []
    return ["", plain_table(["WAVE", "HARDWARE CLASS", "NEW RELEASE", "SAME DEVICES BEFORE", "UNTOUCHED", "VERDICT"],
                            rows)]


def _text(value: object, limit: int = 200) -> str:
    """Stored text that may come from a device (ids, classes, providers, reasons in summaries): one
    line, control characters escaped, "—" when empty (`fleet_cmd.safe_text`)."""
    from edgesdk.cli.fleet_cmd import safe_text

    return "—" if value is None or value == "" else safe_text(value, limit)


def _cohort(c: dict) -> str:
    if not c or not c.get("calls"):
        return "—"
    p95 = c.get("p95_ms")
    return f"p95 {p95:.3g} ms, {c['calls']} calls, {c.get('devices', 0)} dev" if p95 is not None else \
        f"{c['calls']} calls"


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="rollout")
    root.command("rollback")(handle_errors(rollback))
