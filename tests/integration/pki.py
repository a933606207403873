"""A test CA and certificates (subject CN = the name, SAN 127.0.0.1, server and client
use), made with openssl."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(d: Path, names: Iterable[str]) -> Path:
    """``d/ca.crt`` and, per name, ``d/NAME.crt`` and ``d/NAME.key``; returns *d*."""
    d.mkdir(parents=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    for name in names:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))
    return d
