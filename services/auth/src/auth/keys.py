"""The token signing keys: Ed25519, one PEM file per key in `keys_dir`, named by its kid.

A kid is "<activation time>-<hex>" (unix seconds). The newest key whose activation time
has come signs; a key activated later is published in the JWKS at once but signs only
from then on (`auth-keys rotate --activate-in SECONDS`), so verifiers that cache the JWKS,
and auth replicas whose key folder (a Kubernetes Secret volume) is updated a minute or two
after another's, already know it when its first token arrives. Older keys stay in the
JWKS until every token they signed has expired (their successor has been active longer
than the token lifetime plus a margin), so rotation never logs anybody out.

The folder may be read-only (a Secret volume): keys are then only read, and re-read when
the folder changes (kubelet swaps its `..data` symlink; names starting with "." are never
keys). Only a writable folder with no key gets a first key made for it.
`auth-keys rotate` adds a key, `auth-keys list` shows them.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

MARGIN_S = 60

log = logging.getLogger("auth.keys")


class NoSigningKey(RuntimeError):
    """The key folder has no usable key, and none can be made in it."""


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

    def _key_files(self) -> list[Path]:
        # pathlib's "*" also matches dot files: a Secret volume's ..data and ..<timestamp>
        # entries, and our own .<kid>.tmp, are never keys.
        return sorted(p for p in self.dir.glob("*.pem") if not p.name.startswith("."))

    def _load(self) -> None:
        # Reload when the directory changes, so a rotation by another process, or a Secret
        # volume's update (a new ..data symlink and new file links), is picked up.
        stamp = self.dir.stat().st_mtime if self.dir.exists() else None
        if stamp is not None and stamp == self._stamp and self._keys:
            return
        files = self._key_files()
        if not files:
            try:
                self._create(only_if_none=True)
            except OSError as exc:
                raise NoSigningKey(
                    f"no signing key in {self.dir} and none can be made there ({exc.strerror or exc}): "
                    "on a read-only folder (a Kubernetes Secret), generate one with "
                    "`auth-keys rotate --dir PATH` and add its PEM to the Secret"
                ) from exc
            stamp = self.dir.stat().st_mtime
            files = self._key_files()
        keys = []
        for path in files:
            try:
                created = _kid_created(path.stem)
                private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except FileNotFoundError:
                continue  # a link to a key removed meanwhile (a Secret volume's update)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                log.error("%s is not a signing key (<unix time>-<hex>.pem, an Ed25519 PEM): ignored", path.name)
                continue
            except PermissionError:
                log.error("%s cannot be read by this process (uid %d): ignored", path.name, os.getuid())
                continue
            if isinstance(private, Ed25519PrivateKey):
                keys.append(SigningKey(path.stem, created, private))
            else:
                log.error("%s is not an Ed25519 key: ignored", path.name)
        if not keys:
            raise NoSigningKey(f"no usable signing key in {self.dir} ({len(files)} files ignored, see the log)")
        self._keys = sorted(keys, key=lambda k: (k.created, k.kid))
        self._stamp = stamp

    def rotate(self, activate_in_s: int = 0) -> str:
        """Create a new signing key, published at once, signing `activate_in_s` seconds from
        now (0: at once); older keys stay published."""
        if activate_in_s < 0:
            raise ValueError("activate_in_s must not be negative")
        return self._create(only_if_none=False, activate_in_s=activate_in_s)

    def _create(self, *, only_if_none: bool, activate_in_s: int = 0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # several replicas may start at once
            existing = self._key_files()
            if only_if_none and existing:
                return existing[-1].stem  # another process made the first key meanwhile
            kid = f"{int(time.time()) + activate_in_s}-{secrets.token_hex(4)}"
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

    def current(self, now: float | None = None) -> SigningKey:
        """The newest key whose activation time has come; if none has (a first key made
        with --activate-in), the first to come: there is no older one to sign instead."""
        self._load()
        now = time.time() if now is None else now
        active = [k for k in self._keys if k.created <= now]
        return active[-1] if active else self._keys[0]

    def pending(self, now: float | None = None) -> list[SigningKey]:
        """Keys published ahead of their activation time, which do not sign yet."""
        self._load()
        now = time.time() if now is None else now
        current = self.current(now)
        return [k for k in self._keys if k.created > now and k is not current]

    def published(self, now: float | None = None) -> list[SigningKey]:
        """Every key not active yet, the current key, and each older key until its last
        token has expired (its successor signing for longer than the token lifetime plus
        a margin). Newest first."""
        self._load()
        now = time.time() if now is None else now
        keys = self._keys
        out = [keys[-1]]  # the newest: pending, or the current key
        for older, successor in itertools.pairwise(keys):
            # A pending successor (created > now) keeps its predecessor, which still signs.
            if now - successor.created < self.token_ttl_s + MARGIN_S:
                out.append(older)
        return sorted(out, key=lambda k: (k.created, k.kid), reverse=True)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.published()]}


def main(argv: list[str] | None = None) -> None:
    from auth.config import get_settings

    parser = argparse.ArgumentParser(prog="auth-keys", description=__doc__)
    parser.add_argument("command", choices=["rotate", "list", "ensure"])
    parser.add_argument(
        "--dir",
        help="the key folder (default: AUTH_KEYS_DIR); e.g. a local folder whose new PEM goes into a Secret",
    )
    parser.add_argument(
        "--activate-in",
        type=int,
        default=0,
        metavar="SECONDS",
        help="rotate: publish the new key now, sign with it from SECONDS from now (default 0: at once)",
    )
    args = parser.parse_args(argv)
    if args.activate_in < 0:
        parser.error("--activate-in must not be negative")
    settings = get_settings()
    ring = KeyRing(args.dir or settings.keys_dir, settings.access_token_ttl_s)
    try:
        if args.command == "rotate":
            try:
                kid = ring.rotate(args.activate_in)
            except OSError as exc:
                raise NoSigningKey(
                    f"cannot write to {ring.dir} ({exc.strerror or exc}): on a read-only folder (a Kubernetes "
                    "Secret), generate the key elsewhere with --dir PATH and add its PEM to the Secret"
                ) from exc
            when = f"signs from {_iso(_kid_created(kid))}" if args.activate_in else "signs from now on"
            print(f"new signing key: {kid}")  # stdout: the kid alone, as scripts read it
            print(f"wrote {ring.dir / (kid + '.pem')}: published now, {when}", file=sys.stderr)
        elif args.command == "ensure":
            print(f"signing key: {ring.current().kid}")
        else:
            now = time.time()
            published = {k.kid for k in ring.published(now)}
            pending = {k.kid for k in ring.pending(now)}
            current = ring.current(now).kid
            for key in reversed(ring.all()):
                if key.kid in pending:
                    state = f"pending\tsigns from {_iso(key.created)}"
                elif key.kid == current:
                    state = "signing"
                else:
                    state = "published" if key.kid in published else "retired"
                print(f"{key.kid}\t{state}")
    except NoSigningKey as exc:
        print(f"auth-keys: {exc}", file=sys.stderr)
        sys.exit(1)


def _iso(unix: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))
