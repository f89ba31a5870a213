"""A throwaway certificate authority for local TLS (dev only: trustme and cryptography).

``local_tls(directory)`` writes PEM files for 127.0.0.1 and localhost: the CA (what clients
trust), the server's chain and its key (PKCS#8, as Kafka's PEM keystore wants it), and a
client certificate and key for mutual TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalTls", "local_tls"]


@dataclass(frozen=True)
class LocalTls:
    ca: Path
    server_chain: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _pkcs8(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def local_tls(directory: Path) -> LocalTls:
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="Herald local CA")
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("herald-client@example.com")
    files = LocalTls(
        ca=directory / "ca.pem",
        server_chain=directory / "server-chain.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client-cert.pem",
        client_key=directory / "client-key.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    files.server_chain.write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    files.server_key.write_bytes(_pkcs8(server.private_key_pem.bytes()))
    files.client_cert.write_bytes(b"".join(pem.bytes() for pem in client.cert_chain_pems))
    files.client_key.write_bytes(_pkcs8(client.private_key_pem.bytes()))
    for key in (files.server_key, files.client_key):
        key.chmod(0o600)
    return files
