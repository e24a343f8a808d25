"""The one exception tree users catch. The CLI turns any EdgeError into one line and exit code.

    EdgeError                        base; `str(err)` is the one line the CLI prints
    ├── ConfigError                  a profile, agent config or CLI option is invalid (names file and key)
    ├── ModelError                   the input model cannot be read, checked or converted
    │   └── UnsupportedModelError    an op or format the target's runtimes cannot run
    ├── CalibrationDataError         calibration/validation data has wrong names, shapes or dtypes
    ├── PackagingError               a pipeline pass or the package writer failed
    │   └── GateFailedError          --strict and a variant failed its accuracy gate
    ├── PackageError                 a package is unreadable, hostile or inconsistent
    │   ├── SignatureError           the signature is missing, malformed or from an untrusted key
    │   └── IntegrityError           a file's sha256 or size differs from the manifest
    ├── KeyFileError                 a key file is missing or is not an Ed25519 key
    ├── RuntimeUnavailableError      a runtime/provider asked for is not on this machine
    ├── ProtocolError                a malformed MQTT message (bad JSON, missing field, wrong type)
    ├── TrustError                   a deployment statement or trust root was refused (unsigned,
    │                                untrusted key, replayed, expired, downgrade, mix-and-match)
    ├── TransferError                a package transfer failed (too many bytes, bad block)
    │   └── TransferStalledError     no progress or too slow: abandoned, to be retried later
    ├── StorageError                 a file or folder could not be read or written (disk full,
    │                                permission, I/O error); mapped from OSError by `map_os_errors`
    ├── BrokerError                  the broker cannot be reached or refused us
    ├── InstallError                 the agent could not install a package (previous stays active)
    │   └── HealthCheckError         no candidate passed the health check
    └── FleetError                   the fleet store or a fleet command failed
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class EdgeError(Exception):
    """Base of every error edgesdk raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(EdgeError):
    exit_code = 2


class ModelError(EdgeError):
    pass


class UnsupportedModelError(ModelError):
    pass


class CalibrationDataError(EdgeError):
    exit_code = 2


class PackagingError(EdgeError):
    pass


class GateFailedError(PackagingError):
    pass


class PackageError(EdgeError):
    pass


class SignatureError(PackageError):
    pass


class IntegrityError(PackageError):
    pass


class KeyFileError(EdgeError):
    exit_code = 2


class RuntimeUnavailableError(EdgeError):
    pass


class ProtocolError(EdgeError):
    pass


class TrustError(EdgeError):
    pass


class TransferError(EdgeError):
    pass


class TransferStalledError(TransferError):
    """The repository stopped answering or is too slow; the download is retried later."""


class StorageError(EdgeError):
    """File I/O failed. ``errno`` keeps the cause (ENOSPC: disk full) for callers that branch on it."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class BrokerError(EdgeError):
    pass


class InstallError(EdgeError):
    pass


class HealthCheckError(InstallError):
    pass


class FleetError(EdgeError):
    pass


_OS_REASONS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EIO: "I/O error",
               errno.ECONNREFUSED: "connection refused", errno.EHOSTUNREACH: "host unreachable",
               errno.ENETUNREACH: "network unreachable", errno.ETIMEDOUT: "timed out"}


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line, at most ``limit`` characters (its type's name when it
    has no text): what a one-line error message or log line quotes."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def describe_os_error(exc: OSError) -> str:
    """A short reason for an OSError: 'disk full' for ENOSPC, else its strerror."""
    return _OS_REASONS.get(exc.errno or 0) or exc.strerror or type(exc).__name__


@contextlib.contextmanager
def map_os_errors(what: str) -> Iterator[None]:
    """The one place OSError enters the error tree: ``with map_os_errors(f"write {path}"):`` turns
    any OSError into ``StorageError("write <path>: disk full")`` (errno kept), so a full disk is
    reported as a full disk, never as tampering or a crash."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"{what}: {describe_os_error(exc)}", exc.errno) from None
