"""Test certificates, made at run time with the ``openssl`` command (Debian package ``openssl``).

``make_certs(directory)`` writes two independent CAs and, for each, a certificate naming
``localhost`` and ``127.0.0.1`` (good for serving and for dialling), plus one of the first CA
that may only serve. Keys are P-256: a few
milliseconds each. Nothing is downloaded and nothing is kept between test runs.
"""

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")
SKIP_REASON = "the openssl command is not installed (apt-get install openssl)"
DAYS = "2"

LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {usage}
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass
class Identity:
    cert: str
    key: str
    ca: str  # the CA that signed ``cert``


@dataclass
class CertSet:
    server: Identity  # signed by the network's CA
    other: Identity  # signed by another CA: must be refused by the network
    server_only: Identity  # the network's CA, but may only serve: cannot dial another server
    ca: str
    other_ca: str


def _openssl(*args, cwd):
    result = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _new_key(name, cwd):
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", f"{name}.key", cwd=cwd)


def _make_ca(name, cwd):
    _new_key(name, cwd)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.pem", "-days", DAYS,
             "-subj", f"/CN=activitynet test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)
    return str(Path(cwd) / f"{name}.pem")


def _make_leaf(name, ca, cwd, usage="serverAuth, clientAuth"):
    _new_key(name, cwd)
    _openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=localhost",
             cwd=cwd)
    (Path(cwd) / "leaf.ext").write_text(LEAF_EXTENSIONS.format(usage=usage))
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", "1", "-days", DAYS, "-extfile", "leaf.ext", "-out", f"{name}.pem", cwd=cwd)
    return Identity(cert=str(Path(cwd) / f"{name}.pem"), key=str(Path(cwd) / f"{name}.key"),
                    ca=str(Path(cwd) / f"{ca}.pem"))


def make_certs(directory):
    """Write the test CAs and certificates into ``directory``; returns their paths."""
    directory = str(directory)
    ca = _make_ca("ca", directory)
    other_ca = _make_ca("other-ca", directory)
    return CertSet(server=_make_leaf("server", "ca", directory),
                     other=_make_leaf("other", "other-ca", directory),
                     server_only=_make_leaf("server-only", "ca", directory, usage="serverAuth"),
                     ca=ca, other_ca=other_ca)
