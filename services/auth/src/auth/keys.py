"""The token signing keys: Ed25519, one PEM file per key in `keys_dir`, named by its kid.

The newest key signs. Older keys stay in the JWKS until every token they signed has
expired (their successor is older than the token lifetime plus a margin), so rotation
never logs anybody out. `auth-keys rotate` adds a key; `auth-keys list` shows them.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

MARGIN_S = 60


@dataclass(frozen=True)
class SigningKey:
    kid: str
    created: int
    private: Ed25519PrivateKey

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": "EdDSA", "use": "sig"}


def _kid_created(kid: str) -> int:
    return int(kid.split("-", 1)[0])


class KeyRing:
    def __init__(self, keys_dir: str | Path, token_ttl_s: int) -> None:
        self.dir = Path(keys_dir)
        self.token_ttl_s = token_ttl_s
        self._keys: list[SigningKey] = []
        self._stamp: float | None = None

    def _load(self) -> None:
        # Reload when the directory changes, so a rotation by another process is picked up.
        stamp = self.dir.stat().st_mtime if self.dir.exists() else None
        if stamp is not None and stamp == self._stamp and self._keys:
            return
        if not any(self.dir.glob("*.pem")):
            self._create(only_if_none=True)
            stamp = self.dir.stat().st_mtime
        keys = []
        for path in sorted(self.dir.glob("*.pem")):
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(private, Ed25519PrivateKey):
                keys.append(SigningKey(path.stem, _kid_created(path.stem), private))
        self._keys = sorted(keys, key=lambda k: (k.created, k.kid))
        self._stamp = stamp

    def rotate(self) -> str:
        """Create a new signing key: it signs from now on; older keys stay published."""
        return self._create(only_if_none=False)

    def _create(self, *, only_if_none: bool) -> str:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # several replicas may start at once
            existing = sorted(self.dir.glob("*.pem"))
            if only_if_none and existing:
                return existing[-1].stem  # another process made the first key meanwhile
            kid = f"{int(time.time())}-{secrets.token_hex(4)}"
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            tmp = self.dir / f".{kid}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            tmp.rename(self.dir / f"{kid}.pem")
        self._stamp = None
        return kid

    def all(self) -> list[SigningKey]:
        self._load()
        return list(self._keys)

    def current(self) -> SigningKey:
        self._load()
        return self._keys[-1]

    def published(self, now: float | None = None) -> list[SigningKey]:
        """The current key, and each older key until its last token has expired."""
        self._load()
        now = time.time() if now is None else now
        out = [self._keys[-1]]
        for older, successor in zip(self._keys[:-1], self._keys[1:], strict=True):
            if now - successor.created < self.token_ttl_s + MARGIN_S:
                out.append(older)
        return out

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.published()]}


def main(argv: list[str] | None = None) -> None:
    from auth.config import get_settings

    parser = argparse.ArgumentParser(prog="auth-keys", description=__doc__)
    parser.add_argument("command", choices=["rotate", "list", "ensure"])
    args = parser.parse_args(argv)
    settings = get_settings()
    ring = KeyRing(settings.keys_dir, settings.access_token_ttl_s)
    if args.command == "rotate":
        print(f"new signing key: {ring.rotate()}")
    elif args.command == "ensure":
        print(f"signing key: {ring.current().kid}")
    else:
        published = {k.kid for k in ring.published()}
        current = ring.current().kid
        for key in reversed(ring.all()):
            state = "signing" if key.kid == current else ("published" if key.kid in published else "retired")
            print(f"{key.kid}\t{state}")
