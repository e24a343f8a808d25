"""The broker's TLS files: a CA and a server certificate for the broker's host names."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from edgesdk.errors import ConfigError, map_os_errors

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime clients commonly accept for a server certificate


# ECDSA P-256 rather than Ed25519: every TLS stack a device may have (OpenSSL 1.0.2 on old images,
# mbedTLS, wolfSSL) accepts P-256 certificates in TLS 1.2, while Ed25519 certificates need
# OpenSSL 1.1.1+ and are refused by many embedded stacks. Both Mosquitto 2.0.11 and Python's ssl
# (OpenSSL 3) accept this CA and server certificate (tests/edgesdk/test_broker_policy.py).
def new_key():  # noqa: ANN202 - cryptography's key type
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def create_ca(common_name: str, days: int = CA_DAYS):  # noqa: ANN201 - (private key, certificate)
    """A self-signed CA that may sign server certificates only (path length 0)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue_server_cert(ca_key, ca_cert, hosts: Iterable[str], days: int = SERVER_DAYS):  # noqa: ANN001, ANN201
    """A server certificate for ``hosts`` (DNS names and IP addresses as SANs), signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = list(hosts)
    key = new_key()
    sans: list[x509.GeneralName] = []
    for host in hosts:
        ip = parse_ip(host)
        sans.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def cert_hosts(cert) -> set[str]:  # noqa: ANN001
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
            | {name.lower() for name in sans.get_values_for_type(x509.DNSName)})


def load_cert(path: Path):  # noqa: ANN202
    from cryptography import x509

    with map_os_errors(f"read {path}"):
        data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate (use --force to make a new CA)") from None


def load_key(path: Path):  # noqa: ANN202
    from cryptography.hazmat.primitives import serialization

    with map_os_errors(f"read {path}"):
        data = path.read_bytes()
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not a PEM private key (use --force to make a new CA)") from None


def issued_by(cert, ca_cert) -> bool:  # noqa: ANN001
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:  # noqa: BLE001 - ValueError, TypeError or InvalidSignature: not ours either way
        return False
    return True


# -- the whole folder -----------------------------------------------------------------------------
