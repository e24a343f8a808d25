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
    ├── TransferError                a package transfer failed (stall, too many bytes, bad block)
    ├── BrokerError                  the broker cannot be reached or refused us
    ├── InstallError                 the agent could not install a package (previous stays active)
    │   └── HealthCheckError         no candidate passed the health check
    └── FleetError                   the fleet store or a fleet command failed
"""

from __future__ import annotations


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


class TransferError(EdgeError):
    pass


class BrokerError(EdgeError):
    pass


class InstallError(EdgeError):
    pass


class HealthCheckError(InstallError):
    pass


class FleetError(EdgeError):
    pass
