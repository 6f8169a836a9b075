"""Certificates for the TLS tests, made by the openssl command line: a CA, a server certificate for
127.0.0.1/localhost and client certificates with the subjects and SANs a test asks for."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Pki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def issue(self, name: str, subject: str, sans: str = "") -> None:
        """`name`.crt/.key signed by the CA; `subject` as openssl writes it (`/CN=x/O=y`),
        `sans` as an extension value (`DNS:a,URI:spiffe://b`)."""
        d = self.directory
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", subject, cwd=d,
        )  # fmt: skip
        extra: list[str] = []
        if sans:
            (d / f"{name}.ext").write_text(f"subjectAltName={sans}\n")
            extra = ["-extfile", f"{name}.ext"]
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", *extra, cwd=d,
        )  # fmt: skip

    def client_credentials(self, name: str | None = None) -> grpc.ChannelCredentials:
        """Trusts the CA; presents `name`'s certificate when given."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key(name).read_bytes() if name else None,
            certificate_chain=self.cert(name).read_bytes() if name else None,
        )


def make_pki(directory: Path) -> Pki:
    """A CA and `server.crt` for 127.0.0.1 and localhost; `issue` adds client certificates."""
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=ltrec-test-ca", cwd=directory,
    )  # fmt: skip
    pki = Pki(directory)
    pki.issue("server", "/CN=ltrec-server", "DNS:localhost,IP:127.0.0.1")
    return pki
