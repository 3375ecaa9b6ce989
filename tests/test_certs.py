"""Local TLS certificates and node keys."""

from __future__ import annotations

import ipaddress
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.certs import main, make_certs


def test_server_cert_verifies_against_ca_and_has_san(tmp_path):
    p = make_certs(tmp_path, nodes=2)
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # the server key matches the certificate
    key = serialization.load_pem_private_key(p.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == srv.public_key().public_numbers()
    assert stat.S_IMODE(p.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.ca_key.stat().st_mode) == 0o600


def test_node_keys_are_openssh_ecdsa_and_load(tmp_path):
    p = make_certs(tmp_path, nodes=3)
    assert len(p.node_keys) == 3
    for i, priv_path in enumerate(p.node_keys):
        raw = priv_path.read_bytes()
        assert raw.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")  # Flower rejects PEM
        priv = serialization.load_ssh_private_key(raw, None)
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        pub_line = p.node_pub(i).read_bytes()
        assert pub_line.startswith(b"ecdsa-sha2-nistp384 ")
        pub = serialization.load_ssh_public_key(pub_line.split(b" ")[0] + b" " + pub_line.split(b" ")[1])
        assert pub.public_numbers() == priv.public_key().public_numbers()
        assert stat.S_IMODE(priv_path.stat().st_mode) == 0o600
    # Flower's own loader (flower-supernode --auth-supernode-private-key) accepts them
    import argparse

    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for priv_path in p.node_keys:
        args = argparse.Namespace(auth_supernode_private_key=str(priv_path),
                                  auth_supernode_public_key=None)
        priv, pub = _try_setup_client_authentication(args)
        assert isinstance(priv, ec.EllipticCurvePrivateKey)


def test_custom_hosts_and_cli(tmp_path, capsys):
    assert main([str(tmp_path), "--host", "10.0.0.5", "--host", "server.example", "--nodes", "1"]) == 0
    srv = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert san.get_values_for_type(x509.DNSName) == ["server.example"]
    assert (tmp_path / "nodes" / "node0.pub").exists()
    assert "server" in capsys.readouterr().out
