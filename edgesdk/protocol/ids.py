"""The one rule for fleet and device ids, and package ids (sha256 hex).

A device id is its MQTT client id, its broker username, a topic level and a folder name, so one
rule serves all four: 1-64 characters of letters, digits, '.', '_', '-', starting with a letter or
a digit. No '/', '+', '#' (topic syntax), no ':' (Mosquitto's password file separates user and
hash with it), no leading '-' (reads as an option on a command line), no leading '$' (broker-
internal topics). Agent config, CLI options, topics and provisioning all call `check_id`.
"""

from __future__ import annotations

import re

from edgesdk.errors import ProtocolError

ID_RULE = "1-64 letters, digits, '.', '_', '-', starting with a letter or digit"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_id(value: object, what: str) -> str:
    """``value`` if it is a valid fleet/device/share-group id, else ProtocolError naming ``what``."""
    if not is_valid_id(value):
        raise ProtocolError(f"invalid {what} {value!r}: use {ID_RULE}")
    return value  # type: ignore[return-value]


check_name = check_id  # the name older callers use


def is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def check_package_id(value: object) -> str:
    if not is_sha256_hex(value):
        raise ProtocolError(f"invalid package id {value!r}: expected 64 lowercase hex (sha256)")
    return value  # type: ignore[return-value]
