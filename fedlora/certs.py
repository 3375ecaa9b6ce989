"""Local certificates for trying out a Flower deployment with TLS and node authentication.

``make_certs(out_dir, hosts=("127.0.0.1", "localhost"), nodes=3)`` writes::

    out_dir/ca.crt, ca.key            a self-signed CA (ECDSA P-384)
    out_dir/server.pem, server.key    the SuperLink certificate signed by the CA, SAN = ``hosts``
    out_dir/nodes/node<i>, node<i>.pub  node keys for ``flower-supernode --auth-supernode-private-key``
                                      (ECDSA P-384, OpenSSH format: Flower rejects PEM keys)

Only the ``cryptography`` package is used (no ``openssl``/``ssh-keygen`` needed). These certificates
are for local experiments and small private deployments; for a public server use certificates
from your organisation's CA. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass
class CertPaths:
    """Where ``make_certs`` put everything (absolute paths)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path] = field(default_factory=list)  # private keys; public = path + ".pub"

    def node_pub(self, i: int) -> Path:
        return self.node_keys[i].with_name(self.node_keys[i].name + ".pub")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _san(hosts) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(days: int = 365, name: str = "fedlora local CA"):
    """A self-signed CA: ``(private key, certificate)``."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert, hosts=DEFAULT_HOSTS, days: int = 365):
    """A server certificate for ``hosts`` (IPs and DNS names, all in the SAN), signed by the CA."""
    hosts = list(hosts)
    if not hosts:
        raise ValueError("make_server_cert: give at least one host (IP or DNS name) for the SAN")
    key = ec.generate_private_key(ec.SECP384R1())
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_node_key(path: str | os.PathLike, comment: str = "") -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (``path`` private, ``path.pub`` public)."""
    path = Path(path).absolute()
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    if comment:
        pub += b" " + comment.encode()
    _write(path, priv, private=True)
    pub_path = path.with_name(path.name + ".pub")
    _write(pub_path, pub + b"\n")
    return path, pub_path


def make_certs(out_dir: str | os.PathLike, hosts=DEFAULT_HOSTS, nodes: int = 3,
               days: int = 365) -> CertPaths:
    """Write a CA, a server certificate for ``hosts`` and ``nodes`` node key pairs to ``out_dir``."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(days)
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, hosts, days)
    paths = CertPaths(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_key, _key_pem(srv_key), private=True)
    for i in range(nodes):
        priv, _ = make_node_key(out / "nodes" / f"node{i}", comment=f"fedlora-node{i}")
        paths.node_keys.append(priv)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m fedlora.certs OUT_DIR [--host H ...] [--nodes N]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fedlora.certs", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--host", action="append", dest="hosts",
                   help="IP or DNS name the SuperNodes dial (repeat; default 127.0.0.1 + localhost)")
    p.add_argument("--nodes", type=int, default=3, help="node key pairs to make (default 3)")
    p.add_argument("--days", type=int, default=365)
    a = p.parse_args(argv)
    paths = make_certs(a.out_dir, a.hosts or DEFAULT_HOSTS, a.nodes, a.days)
    print(f"CA:      {paths.ca_cert}\nserver:  {paths.server_cert} (key {paths.server_key})")
    for i, k in enumerate(paths.node_keys):
        print(f"node {i}:  {k} (public {paths.node_pub(i)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
