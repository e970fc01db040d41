"""Authentication between the daemons of a job: ZeroMQ CURVE keys derived from one shared secret.

Every daemon of a job reads the same secret file (made once with `ckptd keygen`, mode 0600, on the
shared filesystem or distributed like an SSH key). The leader's server key pair and the followers'
client key pair are both derived from it, and the leader admits only the followers' public key:
a peer without the secret cannot complete the CURVE handshake, so it can neither report nor commit,
and everything on the wire is encrypted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from ckptd.service.errors import ClusterSecretError

SECRET_BYTES = 32
_LABEL = b"ckptd-curve-v1"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded CURVE key pairs of a job's leader (server) and followers (clients)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def derive(cls, secret: bytes) -> "CurveKeys":
        """Both key pairs from the shared secret (any 32 bytes are a valid Curve25519 secret key)."""

        def pair(role: bytes) -> tuple[bytes, bytes]:
            private = z85.encode(hashlib.sha256(_LABEL + b":" + role + b":" + secret).digest())
            return zmq.curve_public(private), private

        server_public, server_secret = pair(b"leader")
        client_public, client_secret = pair(b"follower")
        return cls(server_public, server_secret, client_public, client_secret)


class AllowJobDaemons:
    """ZAP credentials check for a daemon's CURVE server: admit only the client key derived from the
    job's secret (the other daemons of the job)."""

    def __init__(self, allowed: bytes) -> None:
        self._allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        """True for the job's daemons; a stranger is refused and logged."""
        if key != self._allowed:
            log.warning("refused a daemon connection with an unknown CURVE key (not derived from this job's secret)")
            return False
        return True


def write_secret(path: str) -> None:
    """Create a new secret file at `path` (mode 0600); refuses to overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(SECRET_BYTES) + "\n")


def load_secret(path: str) -> bytes:
    """The secret in `path`, after checking that only its owner (this user) can read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ClusterSecretError(
            f"cannot open the cluster secret {path}: {exc.strerror}; create one with `ckptd keygen PATH`"
        ) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise ClusterSecretError(
                f"cluster secret {path} must belong to this user and be readable by it alone "
                f"(mode {stat.S_IMODE(info.st_mode):o}); run `chmod 600 {path}`"
            )
        secret = f.read(4096).strip()
    if len(secret) < SECRET_BYTES:
        raise ClusterSecretError(
            f"cluster secret {path} holds {len(secret)} bytes; it needs at least {SECRET_BYTES} "
            "(create one with `ckptd keygen PATH`)"
        )
    return secret
