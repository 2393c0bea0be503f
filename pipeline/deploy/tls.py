"""TLS material for a fedpipe Dask cluster: a private CA and the certificates it signs.

distributed authenticates both ends of every connection against the cluster CA and does not
check host names (``check_hostname = False`` in :mod:`distributed.security`), so one
certificate signed by a dedicated CA can serve scheduler, workers and the driver
(:func:`generate`); :func:`generate_roles` and :func:`ensure_roles` give each member its own,
so one leaked key exposes one member and can be replaced alone. The CA key never leaves the
directory it was generated in: only ``ca.crt`` and a member's ``tls.crt``/``tls.key`` go into
a Kubernetes Secret.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedpipe.errors import ConfigError

if TYPE_CHECKING:
    from distributed.security import Security

# File names double as the keys of the Kubernetes Secret mounted into the pods.
CA_CERT = "ca.crt"
CERT = "tls.crt"
KEY = "tls.key"
CA_KEY = "ca.key"  # stays on the machine that generated it; never put into a Secret


@dataclass(frozen=True)
class TLSFiles:
    """Paths of the PEM files a cluster member needs.

    Attributes
    ----------
    ca : Path
        CA certificate every member trusts.
    cert, key : Path
        Certificate and private key presented by scheduler, workers and driver.
    """

    ca: Path
    cert: Path
    key: Path

    def security(self, require_encryption: bool = True) -> Security:
        """A :class:`distributed.Security` using these files for every role."""
        from distributed.security import Security

        paths = {"tls_ca_file": str(self.ca)}
        for role in ("client", "scheduler", "worker"):
            paths[f"tls_{role}_cert"] = str(self.cert)
            paths[f"tls_{role}_key"] = str(self.key)
        return Security(require_encryption=require_encryption, **paths)


def load(directory: str | os.PathLike) -> TLSFiles:
    """Take existing TLS material from ``directory`` (``ca.crt``, ``tls.crt``, ``tls.key``).

    Raises
    ------
    ConfigError
        Naming the first missing file.
    """
    root = Path(directory)
    files = TLSFiles(root / CA_CERT, root / CERT, root / KEY)
    for path in (files.ca, files.cert, files.key):
        if not path.is_file():
            raise ConfigError(f"TLS file {path} is missing (expected {CA_CERT}, {CERT}, {KEY})")
    return files


def generate(
    directory: str | os.PathLike,
    hosts: Sequence[str] = ("localhost",),
    days: int = 365,
) -> TLSFiles:
    """Create a CA and a certificate it signs in ``directory`` (keys written with mode 0600).

    Parameters
    ----------
    directory : path
        Created if missing. Existing files of the same names are overwritten.
    hosts : sequence of str
        Subject alternative names: DNS names or IP addresses (e.g. the scheduler Service's
        ``NAME-scheduler.NAMESPACE.svc``). distributed does not check them; they make the
        certificate honest for tools that do.
    days : int
        Validity of both certificates.
    """
    root = Path(directory)
    # One certificate for every member: tls.crt / tls.key, the names the Secret's keys take.
    return _sign_role(root, CERT.removesuffix(".crt"), _new_ca(root, days), hosts, days,
                      common_name="fedpipe-dask")


ROLES = ("scheduler", "worker", "client")


def generate_roles(
    directory: str | os.PathLike,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    roles: Sequence[str] = ROLES,
) -> dict[str, TLSFiles]:
    """A new CA and one certificate per role: ``ROLE.crt`` and ``ROLE.key`` signed by ``ca.crt``.

    Each role (scheduler, workers, the driver as ``client``) gets its own key, so a leaked
    worker key does not let its holder present the driver's certificate, and each can be
    revoked or rotated alone. A member without a certificate of this CA is refused by all.
    Existing files of the same names are replaced (see :func:`ensure_roles` to keep them).

    Returns
    -------
    dict of str to TLSFiles
        ``role -> TLSFiles(ca, cert, key)``; ``ca.key`` stays in ``directory``.
    """
    root = Path(directory)
    ca = _new_ca(root, days)
    return {role: _sign_role(root, role, ca, hosts, days) for role in roles}


def ensure_roles(
    directory: str | os.PathLike,
    roles: Sequence[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
) -> dict[str, TLSFiles]:
    """Like :func:`generate_roles`, but keeps what ``directory`` already holds.

    The CA (``ca.crt`` + ``ca.key``) and every role with both ``ROLE.crt`` and ``ROLE.key`` are
    reused; only missing roles are signed, so rendering again after adding a client neither
    replaces the CA the cluster trusts nor rotates the other members' keys.

    Raises
    ------
    ConfigError
        A role is missing and ``ca.key`` is not there to sign it.
    """
    root = Path(directory)
    have = {r for r in roles if (root / f"{r}.crt").is_file() and (root / f"{r}.key").is_file()}
    missing = [r for r in roles if r not in have]
    ca = None
    if missing:
        if (root / CA_CERT).is_file() != (root / CA_KEY).is_file():
            raise ConfigError(f"{root} holds only one of {CA_CERT} and {CA_KEY}: cannot sign "
                              f"a certificate for {missing[0]!r}; give a directory with both "
                              "or an empty one")
        ca = _load_ca(root) if (root / CA_KEY).is_file() else _new_ca(root, days)
    files = {}
    for role in roles:
        files[role] = (TLSFiles(root / CA_CERT, root / f"{role}.crt", root / f"{role}.key")
                       if role in have else _sign_role(root, role, ca, hosts, days))
    return files


def _new_ca(root: Path, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpipe-dask-ca")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(*_usage(cert_sign=True)), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(root / CA_KEY, _key_pem(ca_key), private=True)
    _write(root / CA_CERT, _cert_pem(ca_cert))
    return ca_key, ca_cert


def _load_ca(root: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key((root / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((root / CA_CERT).read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{root / CA_KEY} or {root / CA_CERT} is not a PEM key/certificate: "
                          f"{exc}") from None
    return key, cert


def _sign_role(root: Path, role: str, ca, hosts: Sequence[str], days: int,
               common_name: str | None = None) -> TLSFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key, ca_cert = ca
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"fedpipe-{role}")])
    cert = (
        _builder(name, ca_cert.subject, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(root / f"{role}.key", _key_pem(key), private=True)
    _write(root / f"{role}.crt", _cert_pem(cert))
    return TLSFiles(root / CA_CERT, root / f"{role}.crt", root / f"{role}.key")


def client_config(ca_file: str, cert: str, key: str) -> dict[str, str]:
    """Dask settings that make the driver a TLS client of a scheduler (``--tls-*`` flags).

    Raises
    ------
    ConfigError
        Naming the first of the three files that is missing.
    """
    for flag, path in (("--tls-ca-file", ca_file), ("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    return {"distributed.comm.tls.ca-file": str(ca_file),
            "distributed.comm.tls.client.cert": str(cert),
            "distributed.comm.tls.client.key": str(key),
            "distributed.comm.require-encryption": True}


def _builder(subject, issuer, public_key, now, days):
    from cryptography import x509

    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # A minute of slack: pods on other nodes may have clocks slightly behind ours.
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _usage(cert_sign: bool) -> tuple[bool, ...]:
    # KeyUsage's nine positional flags; a CA only signs certificates and CRLs.
    return (False, False, False, False, False, cert_sign, cert_sign, False, False)


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # Create private keys 0600 from the start rather than chmod afterwards (no readable window).
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
