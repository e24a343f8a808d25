"""Topic names of the protocol (docs/protocol.md): every topic is built here, from checked ids."""

from __future__ import annotations

from edgesdk.protocol.ids import check_id, check_package_id, is_valid_id

ROOT = "edgesdk/v1"
SHARE_GROUP = "edgesdk-repo"


# -- topics ------------------------------------------------------------------------------------
def fleet_root(fleet: str) -> str:
    return f"{ROOT}/{check_id(fleet, 'fleet')}"


def _device(fleet: str, device_id: str, leaf: str) -> str:
    return f"{fleet_root(fleet)}/devices/{check_id(device_id, 'device id')}/{leaf}"


def device_state(fleet: str, device_id: str) -> str:
    """Retained; DeviceState, with an 'offline' Last Will."""
    return _device(fleet, device_id, "state")


def device_desired(fleet: str, device_id: str, name: str) -> str:
    """Retained, QoS 1; the signed deployment statement for model ``name`` on the device, written
    only by the fleet service and operators. One topic per model name: a statement for one model
    never replaces another's."""
    return f"{_device(fleet, device_id, 'desired')}/{check_id(name, 'model name')}"


def device_desired_filter(fleet: str, device_id: str) -> str:
    """What a device subscribes to: the desired statements of all its models."""
    return _device(fleet, device_id, "desired/+")


def parse_desired_name(fleet: str, device_id: str, topic: str) -> str | None:
    """The model name in a `devices/{id}/desired/{name}` topic of this device, or None."""
    prefix = _device(fleet, device_id, "desired/")
    if not topic.startswith(prefix):
        return None
    name = topic[len(prefix):]
    return name if is_valid_id(name) else None


def device_events(fleet: str, device_id: str) -> str:
    """QoS 1; InstallEvent."""
    return _device(fleet, device_id, "events")


def device_telemetry(fleet: str, device_id: str) -> str:
    """QoS 1; TelemetryWindow."""
    return _device(fleet, device_id, "telemetry")


def device_blocks(fleet: str, device_id: str) -> str:
    """The device's response topic for block requests (inside its own subtree, for `%c` ACLs)."""
    return _device(fleet, device_id, "blocks")


def devices_filter(fleet: str, leaf: str) -> str:
    """Subscription filter over every device, e.g. devices_filter(f, 'telemetry'); the desired
    statements of every model of every device are devices_filter(f, 'desired/+')."""
    return f"{fleet_root(fleet)}/devices/+/{leaf}"


def package_get(fleet: str, package_id: str) -> str:
    """Where a device publishes its BlockRequest for one package."""
    return f"{fleet_root(fleet)}/packages/{check_package_id(package_id)}/get"


def package_get_shared(fleet: str, group: str = SHARE_GROUP) -> str:
    """The repository's MQTT 5 shared subscription: each request goes to one of the servers."""
    return f"$share/{check_id(group, 'share group')}/{fleet_root(fleet)}/packages/+/get"


def parse_package_get(fleet: str, topic: str) -> str | None:
    """The package id in a `packages/{id}/get` topic of this fleet, or None (id not validated)."""
    prefix, suffix = f"{fleet_root(fleet)}/packages/", "/get"
    if topic.startswith(prefix) and topic.endswith(suffix):
        middle = topic[len(prefix):-len(suffix)]
        return middle if "/" not in middle else None
    return None


def parse_device_topic(fleet: str, topic: str) -> tuple[str, str] | None:
    """(device id, leaf) for `devices/{id}/{leaf}` topics of this fleet, else None. The leaf of
    `devices/{id}/desired/{name}` is `desired/{name}`."""
    prefix = f"{fleet_root(fleet)}/devices/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix):].split("/")
    if len(parts) == 3 and parts[1] == "desired" and is_valid_id(parts[2]):
        parts = [parts[0], f"desired/{parts[2]}"]
    if len(parts) != 2 or not is_valid_id(parts[0]):
        return None
    return parts[0], parts[1]


def trust_root_topic(fleet: str) -> str:
    """Retained; the chain of signed trust-root versions after the first (docs/security.md)."""
    return f"{fleet_root(fleet)}/trust/root"
