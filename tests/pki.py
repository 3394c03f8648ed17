"""A throwaway PKI for the tests that run TLS: a CA, a server certificate for
``localhost`` and ``127.0.0.1`` it issued, and an unrelated CA of the same
name (``make_pki``), plus endpoint-string helpers."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class PKI:
    ca_dir: Path  # trustRoots: only the CA's PEM
    other_ca_dir: Path  # trustRoots: an unrelated CA
    ca_pem: bytes
    key: Path  # the server's private key (PEM)
    cert: Path  # the server's certificate (PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tunnel tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(tmp_path: Path) -> PKI:
    """A CA, a certificate it issued for localhost and 127.0.0.1, and another
    CA of the same name that trusts nothing of it, written under ``tmp_path``."""
    ca_key, ca_cert = _make_ca("tunnel test CA")
    server_key, server_cert = _make_server_cert(ca_key, ca_cert)
    _, other_cert = _make_ca("tunnel test CA")  # same name, different key: not trusted

    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca.pem").write_bytes(_pem(ca_cert))
    other_ca_dir = tmp_path / "other-ca"
    other_ca_dir.mkdir()
    (other_ca_dir / "ca.pem").write_bytes(_pem(other_cert))

    key = tmp_path / "server.key"
    key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert = tmp_path / "server.pem"
    cert.write_bytes(_pem(server_cert))
    return PKI(ca_dir, other_ca_dir, _pem(ca_cert), key, cert)


def esc(value: object) -> str:
    """Quote a value for an endpoint description (``\\`` and ``:`` are special)."""
    return str(value).replace("\\", "\\\\").replace(":", "\\:")


def ssl_listen(pki: PKI, port: int | str = 0) -> str:
    return f"ssl:{port}:interface=127.0.0.1:privateKey={esc(pki.key)}:certKey={esc(pki.cert)}"
