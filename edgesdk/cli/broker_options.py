"""The broker options every host command shares (--broker, --ca, --cert, --client-key, --username,
--password, --password-file), and the one function that turns them into a BrokerConfig.

Each option falls back to an environment variable, the ones `edgesdk broker config` writes into
DIR/operator.env and DIR/fleet-service.env, so ``set -a; . DIR/operator.env`` is all a host
command needs: EDGESDK_BROKER, EDGESDK_BROKER_CA, EDGESDK_BROKER_USERNAME, EDGESDK_BROKER_PASSWORD
(and EDGESDK_BROKER_PASSWORD_FILE). An option given on the command line wins over the variable.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from edgesdk.errors import ConfigError

BROKER_HELP = "Broker URL: mqtt://host[:1883] or mqtts://host[:8883] (TLS)."
ENV_BROKER = "EDGESDK_BROKER"
ENV_CA = "EDGESDK_BROKER_CA"
ENV_USERNAME = "EDGESDK_BROKER_USERNAME"
ENV_PASSWORD = "EDGESDK_BROKER_PASSWORD"
ENV_PASSWORD_FILE = "EDGESDK_BROKER_PASSWORD_FILE"


def broker_config(url: str, ca: Path | None, cert: Path | None, client_key: Path | None, username: str | None,
                  password: str | None, password_file: Path | None = None):
    """A validated BrokerConfig from the shared options (ConfigError names what is wrong)."""
    from edgesdk.broker import TlsConfig, parse_broker_url

    tls = None
    if url.startswith("mqtts://"):
        tls = TlsConfig(ca_file=ca, cert_file=cert, key_file=client_key)
    elif ca or cert or client_key:
        raise ConfigError("--ca/--cert/--client-key need an mqtts:// broker URL")
    if password is not None and password_file is not None:
        raise ConfigError("give --password or --password-file, not both")
    # Read here rather than with typer's envvar=, so that an explicit --password-file wins over a
    # password in the environment (an operator may have sourced an .env file).
    if password is None and password_file is None:
        password = os.environ.get(ENV_PASSWORD) or None
        if password is None and os.environ.get(ENV_PASSWORD_FILE):
            password_file = Path(os.environ[ENV_PASSWORD_FILE])
    if password_file is not None:
        password = read_password_file(password_file)
    return parse_broker_url(url, tls=tls, username=username, password=password)


def read_password_file(path: Path) -> str:
    """The first line of ``path`` (the whole file less its line ending); ConfigError on any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--password-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"--password-file {path}: cannot read it ({reason})") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError(f"--password-file {path}: empty")
    return password


def _broker_options() -> dict:
    return dict(
        broker=typer.Option("mqtt://127.0.0.1:1883", "--broker", envvar=ENV_BROKER, help=BROKER_HELP),
        ca=typer.Option(None, "--ca", envvar=ENV_CA,
                        help="CA certificate file for mqtts:// (default: system CAs)."),
        cert=typer.Option(None, "--cert", help="Client certificate for mqtts:// (with --client-key)."),
        client_key=typer.Option(None, "--client-key", help="Client certificate's private key."),
        username=typer.Option(None, "--username", envvar=ENV_USERNAME, help="Broker username."),
        password=typer.Option(None, "--password", help=f"Broker password (default: ${ENV_PASSWORD}). On the "
                              "command line it is visible to other users of this machine (ps, /proc): prefer "
                              "--password-file or the variable."),
        password_file=typer.Option(None, "--password-file", help="File whose first line is the broker password "
                                   f"(default: ${ENV_PASSWORD_FILE})."),
    )


B = _broker_options()  # use as defaults: ``broker: str = B["broker"], ca: Path = B["ca"], ...``
