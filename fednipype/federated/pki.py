"""Certificates and keys for a federation: a local CA, the SuperLink's TLS certificate, node keys.

A consortium needs three kinds of key material:

- a certificate authority (CA) whose certificate every SuperNode and every ``flwr`` command
  trusts (``--root-certificates`` / ``root-certificates`` in ``config.toml``);
- the SuperLink's TLS certificate, signed by that CA, naming every host name and IP address
  the sites connect to in its subjectAltName (``127.0.0.1`` and ``localhost`` always);
- one ECDSA P-384 key pair per SuperNode, in OpenSSH format: the coordinator registers the
  public key with ``flwr supernode register KEY.pub CONNECTION`` and the SuperNode proves its
  identity with the private key (``flower-supernode --auth-supernode-private-key KEY``).

Everything is made with the ``cryptography`` package (no ``openssl`` or ``ssh-keygen``
subprocess). Private keys are written unencrypted with mode 0600: they are meant for tests
and local consortia; a production consortium uses its institution's CA and keeps each site's
private key at that site only.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> with tempfile.TemporaryDirectory() as tmp:
...     pki = make_local_pki(Path(tmp), ["site-a"])
...     sorted(p.name for p in Path(tmp).iterdir())
['ca.crt', 'ca.key', 'server.crt', 'server.key', 'site-a.key', 'site-a.key.pub']
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fednipype.exceptions import FederationError

__all__ = [
    "DEFAULT_HOSTS",
    "CertificateAuthority",
    "LocalPKI",
    "NodeKey",
    "ServerCertificate",
    "make_ca",
    "make_local_pki",
    "make_node_key",
    "make_server_certificate",
]

#: The names every local SuperLink certificate carries.
DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")

_NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Tolerance for clocks of the machines in a consortium that disagree a little.
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA's certificate and private key, as files.

    Attributes
    ----------
    cert : Path
        PEM certificate (what every client trusts).
    key : Path
        PEM private key (PKCS#8, unencrypted, mode 0600).
    """

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertificate:
    """The SuperLink's TLS certificate and key, as files.

    Attributes
    ----------
    cert : Path
        PEM certificate signed by the CA.
    key : Path
        PEM private key (PKCS#8, unencrypted, mode 0600).
    hosts : tuple of str
        The names and addresses in its subjectAltName.
    """

    cert: Path
    key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair in OpenSSH format.

    Attributes
    ----------
    private : Path
        OpenSSH private key (mode 0600), for ``--auth-supernode-private-key``.
    public : Path
        ``<private>.pub``, one ``ecdsa-sha2-nistp384`` line, for ``flwr supernode register``.
    """

    private: Path
    public: Path


@dataclass(frozen=True)
class LocalPKI:
    """Everything a local consortium needs: CA, SuperLink certificate, node keys.

    Attributes
    ----------
    ca : CertificateAuthority
    server : ServerCertificate
    nodes : dict of str to NodeKey
        One key pair per SuperNode name.
    """

    ca: CertificateAuthority
    server: ServerCertificate
    nodes: dict[str, NodeKey] = field(default_factory=dict)


def _write(path: Path, data: bytes, *, private: bool) -> Path:
    """Write ``data`` to ``path``; a private file is created with mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        # an existing file keeps its old mode through O_CREAT: set it explicitly
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_name(host: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS SAN for anything else."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(ch.isspace() for ch in host) or "/" in host or ":" in host:
        raise FederationError(f"server certificate host {host!r}: expected an IP or DNS name")
    return x509.DNSName(host)


def _load_ca(ca: CertificateAuthority) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise FederationError(f"{ca.cert}: cannot read the CA certificate or key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FederationError(f"{ca.key}: expected an elliptic-curve CA key")
    return cert, key


def make_ca(
    directory: Path,
    *,
    common_name: str = "fednipype local consortium CA",
    days: int = 30,
    stem: str = "ca",
) -> CertificateAuthority:
    """Create a self-signed CA (ECDSA P-384) and write ``<stem>.crt`` and ``<stem>.key``.

    Parameters
    ----------
    directory : Path
        Folder to write into (created if missing).
    common_name : str
        The CA's subject common name.
    days : int
        Validity in days, counted from now (minus five minutes for clock skew).
    stem : str
        File name stem.

    Returns
    -------
    CertificateAuthority
    """
    if days < 1:
        raise FederationError(f"CA validity days={days}: expected at least 1")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    directory = Path(directory)
    return CertificateAuthority(
        cert=_write(
            directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM), private=False
        ),
        key=_write(directory / f"{stem}.key", _private_pem(key), private=True),
    )


def make_server_certificate(
    ca: CertificateAuthority,
    directory: Path,
    *,
    hosts: Iterable[str] = (),
    days: int = 30,
    stem: str = "server",
) -> ServerCertificate:
    """Create the SuperLink's TLS certificate (ECDSA P-256), signed by ``ca``.

    Parameters
    ----------
    ca : CertificateAuthority
        The CA that signs it.
    directory : Path
        Folder to write ``<stem>.crt`` and ``<stem>.key`` into.
    hosts : iterable of str
        Extra host names or IP addresses for the subjectAltName, besides ``127.0.0.1`` and
        ``localhost`` (always present).
    days : int
        Validity in days; never beyond the CA's own.
    stem : str
        File name stem.

    Returns
    -------
    ServerCertificate

    Raises
    ------
    FederationError
        A host is neither an IP address nor a DNS name, or the CA cannot be read.
    """
    if days < 1:
        raise FederationError(f"server certificate validity days={days}: expected at least 1")
    all_hosts = tuple(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    names = [_general_name(host) for host in all_hosts]
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[1])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    directory = Path(directory)
    return ServerCertificate(
        cert=_write(
            directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM), private=False
        ),
        key=_write(directory / f"{stem}.key", _private_pem(key), private=True),
        hosts=all_hosts,
    )


def make_node_key(private_path: Path, *, comment: str | None = None) -> NodeKey:
    """Create a SuperNode's ECDSA P-384 key pair in OpenSSH format.

    The private key goes to ``private_path`` (mode 0600), the public key to
    ``private_path + ".pub"`` as one ``ecdsa-sha2-nistp384 AAAA... comment`` line, the format
    ``ssh-keygen -t ecdsa -b 384`` writes and ``flwr supernode register`` reads.

    Parameters
    ----------
    private_path : Path
        Where to write the private key.
    comment : str, optional
        Comment appended to the public key line (default: the file's stem).

    Returns
    -------
    NodeKey
    """
    private_path = Path(private_path)
    comment = private_path.stem if comment is None else comment
    if any(ch in comment for ch in "\r\n"):
        raise FederationError(f"{private_path}: a key comment must be one line")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = public + (b" " + comment.encode() if comment else b"") + b"\n"
    public_path = private_path.with_name(private_path.name + ".pub")
    return NodeKey(
        private=_write(private_path, private, private=True),
        public=_write(public_path, line, private=False),
    )


def make_local_pki(
    directory: Path,
    node_names: Sequence[str],
    *,
    extra_hosts: Iterable[str] = (),
    days: int = 30,
) -> LocalPKI:
    """Create a CA, a SuperLink certificate and one key pair per SuperNode in ``directory``.

    Parameters
    ----------
    directory : Path
        Folder for ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` and, per node,
        ``<name>.key`` and ``<name>.key.pub``.
    node_names : sequence of str
        SuperNode names, ``[A-Za-z0-9._-]{1,64}``, distinct, none named ``ca`` or ``server``.
    extra_hosts : iterable of str
        Host names or addresses of the SuperLink besides ``127.0.0.1`` and ``localhost``.
    days : int
        Validity of the certificates in days.

    Returns
    -------
    LocalPKI
    """
    names = list(node_names)
    for name in names:
        if not _NODE_NAME.fullmatch(name) or name in {"ca", "server"}:
            raise FederationError(
                f"node name {name!r}: expected [A-Za-z0-9._-]{{1,64}}, not 'ca' or 'server'"
            )
    if len(set(names)) != len(names):
        raise FederationError(f"node names {names}: expected distinct names")
    directory = Path(directory)
    ca = make_ca(directory, days=days)
    server = make_server_certificate(ca, directory, hosts=extra_hosts, days=days)
    nodes = {name: make_node_key(directory / f"{name}.key") for name in names}
    return LocalPKI(ca=ca, server=server, nodes=nodes)
