"""Mosquitto's password file: the `$7$` PBKDF2-SHA512 lines mosquitto_passwd (2.0) writes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from edgesdk.atomicfile import write_text_atomic
from edgesdk.errors import ConfigError, EdgeError, map_os_errors

# mosquitto_passwd (2.0) writes PBKDF2-SHA512 with 101 iterations and a 12-byte salt. Every
# password here is 32 random bytes (256 bits), so key stretching adds nothing an attacker could
# notice; more iterations would only slow down each CONNECT. Mosquitto reads the count per line.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
_HASH_LINE = re.compile(r"\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """``$7$ITERATIONS$SALT$HASH``: PBKDF2-SHA512, base64, the format mosquitto_passwd writes."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(encoded: str, password: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (constant-time compare)."""
    match = _HASH_LINE.fullmatch(encoded)
    if match is None:
        return False
    iterations, salt, expected = int(match[1]), base64.b64decode(match[2]), base64.b64decode(match[3])
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(digest, expected)


def new_password() -> str:
    """32 random bytes, URL-safe base64 (no characters a shell or an env file would mangle)."""
    return secrets.token_urlsafe(32)


def read_password_file(path: Path) -> dict[str, str]:
    """username -> hash, in file order; {} when the file does not exist."""
    try:
        with map_os_errors(f"read {path}"):
            text = path.read_text(encoding="utf-8")
    except EdgeError:
        if not path.exists():
            return {}
        raise
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"{path}:{number}: not a 'username:hash' line")
        entries[user] = encoded
    return entries


def write_password_file(path: Path, entries: Mapping[str, str]) -> None:
    """Write atomically, mode 0600, keeping the owner of the file it replaces: Mosquitto re-reads
    it on SIGHUP as the user it dropped to, so a root-owned replacement would lock everyone out."""
    owner = _owner(path)
    text = "".join(f"{user}:{encoded}\n" for user, encoded in entries.items())
    with map_os_errors(f"write {path}"):
        write_text_atomic(path, text, 0o600)
        if owner is not None and os.geteuid() == 0:
            os.chown(path, *owner)


def set_password(path: Path, username: str, password: str) -> None:
    """Add ``username`` to the password file, or replace its password."""
    if ":" in username or not username or username != username.strip():
        raise ConfigError(f"username {username!r}: must be non-empty, without ':' or surrounding spaces")
    entries = read_password_file(path)
    entries[username] = hash_password(password)
    write_password_file(path, entries)


def _owner(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_uid, st.st_gid
