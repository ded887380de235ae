"""Make a test CA, a server certificate and one certificate per device, plus a tokens file.

    python -m deploy.make_certs OUT_DIR --devices 4 --san coordinator.lan --san 10.213.0.1

Writes ca.pem (+ ca.key), server.pem/server.key, device-<i>.pem/device-<i>.key and tokens.toml (see
server/auth.py). For tests and trials: a real deployment signs with its own CA and keeps ca.key offline.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgelora test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(names) -> x509.SubjectAlternativeName:
    out = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


def _cert(subject, issuer, key, signer, days, *, ca=False, usage=None, sans=()):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        b = b.add_extension(_san(sans), critical=False)
    return b.sign(signer, hashes.SHA256())


def _write(out: Path, stem: str, cert, key) -> None:
    (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp = out / f"{stem}.key"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    os.chmod(kp, 0o600)


def make_certs(out: Path, devices: int, sans=(), ca_name: str = "edgelora test CA", days: int = 30) -> Path:
    from edgelora.server.auth import make_tokens

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name(ca_name), _name(ca_name), ca_key, ca_key, days, ca=True)
    _write(out, "ca", ca, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    _write(out, "server", _cert(_name("edgelora coordinator"), ca.subject, key, ca_key, days,
                                usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=(*DEFAULT_SANS, *sans)), key)
    for i in range(devices):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(out, f"device-{i}", _cert(_name(f"edgelora device {i}"), ca.subject, key, ca_key, days,
                                         usage=ExtendedKeyUsageOID.CLIENT_AUTH), key)
    (out / "tokens.toml").write_text(make_tokens(str(i) for i in range(devices)))
    os.chmod(out / "tokens.toml", 0o600)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.make_certs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write the PEM files and tokens.toml into")
    ap.add_argument("--devices", type=int, default=2, help="device certificates and tokens to make (ids 0..N-1)")
    ap.add_argument("--san", action="append", default=[], help="extra server name or IP (repeatable)")
    ap.add_argument("--ca-name", default="edgelora test CA")
    ap.add_argument("--days", type=int, default=30)
    a = ap.parse_args(argv)
    out = make_certs(Path(a.out), a.devices, a.san, a.ca_name, a.days)
    print(f"wrote ca.pem, server.pem/.key, device-0..{a.devices - 1}.pem/.key and tokens.toml to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
