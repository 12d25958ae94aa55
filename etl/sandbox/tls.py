"""A self-signed TLS certificate for the local sandbox servers (issue #3, "sandbox Google").

The real ``google-ads`` client always opens a *secure* gRPC channel (``shared/reference/stack.md``
section 4: there is no insecure switch), so the sandbox must speak TLS with a certificate the
client trusts. gRPC's C core reads its trust roots from ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``
**once per process, when the first secure channel is made**; setting the variable later has no
effect. Hence one certificate per process: every sandbox started in the process reuses it, so
the roots file never has to change after a channel exists.

The roots file holds our certificate followed by the public CA bundle of ``certifi`` (when
installed), so a process that also talks to real Google keeps working.
"""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOTS_ENV = "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"

_lock = threading.Lock()
_material: SandboxTLS | None = None


@dataclass(frozen=True)
class SandboxTLS:
    """PEM bytes of the key and certificate, and the roots file handed to gRPC."""

    key_pem: bytes
    cert_pem: bytes
    roots_path: Path


def _make_certificate() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medspa-sandbox.localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _public_roots() -> bytes:
    try:
        import certifi
    except ImportError:  # pragma: no cover - certifi ships with requests
        return b""
    return Path(certifi.where()).read_bytes()


def sandbox_tls() -> SandboxTLS:
    """Return this process's sandbox certificate, creating it (and its temp folder) once.

    Also points ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` at the roots file. The caller must make sure
    this runs before the first secure gRPC channel of the process (``GoogleSandbox.__enter__``
    does); a channel made earlier has already loaded other roots and will refuse the sandbox.
    """
    global _material
    with _lock:
        if _material is None:
            folder = Path(tempfile.mkdtemp(prefix="medspa-sandbox-tls-"))
            atexit.register(shutil.rmtree, folder, True)
            key_pem, cert_pem = _make_certificate()
            (folder / "key.pem").write_bytes(key_pem)
            os.chmod(folder / "key.pem", 0o600)
            (folder / "cert.pem").write_bytes(cert_pem)
            roots = folder / "roots.pem"
            roots.write_bytes(cert_pem + b"\n" + _public_roots())
            _material = SandboxTLS(key_pem=key_pem, cert_pem=cert_pem, roots_path=roots)
        os.environ[ROOTS_ENV] = str(_material.roots_path)
        return _material
