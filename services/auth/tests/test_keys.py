from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from auth.config import Settings
from auth.keys import MARGIN_S, KeyRing, NoSigningKey
from auth.main import create_app
from auth.security import TokenIssuer
from svckit.jwt import JWKSVerifier

from .factories import SERVICE_TOKEN


def verifier_for(ring: KeyRing) -> JWKSVerifier:
    return JWKSVerifier(ring.jwks, issuer="iss", audience="aud", min_refresh_s=0)


class TestKeyRotation:
    def test_first_use_creates_a_private_key_file_only_the_owner_reads(self, tmp_path: Path) -> None:
        ring = KeyRing(tmp_path / "keys", token_ttl_s=900)
        kid = ring.current().kid
        pem = tmp_path / "keys" / f"{kid}.pem"
        assert pem.exists()
        assert pem.stat().st_mode & 0o777 == 0o600
        assert KeyRing(tmp_path / "keys", token_ttl_s=900).current().kid == kid  # kept across restarts

    def test_rotation_signs_with_the_new_key_and_keeps_old_tokens_valid(self, tmp_path: Path) -> None:
        ring = KeyRing(tmp_path, token_ttl_s=900)
        issuer = TokenIssuer(ring, issuer="iss", audience="aud", ttl_s=900)
        old_token = issuer.issue(7)
        old_kid = ring.current().kid
        time.sleep(1.01)  # kids are ordered by creation second
        new_kid = ring.rotate()
        assert ring.current().kid == new_kid != old_kid
        assert {k["kid"] for k in ring.jwks()["keys"]} == {old_kid, new_kid}
        verifier = verifier_for(ring)
        assert verifier.verify(old_token).user_id == 7
        assert verifier.verify(issuer.issue(8)).user_id == 8

    def test_old_keys_leave_the_jwks_once_their_tokens_have_expired(self, tmp_path: Path) -> None:
        ring = KeyRing(tmp_path, token_ttl_s=900)
        old_kid = ring.current().kid
        time.sleep(1.01)
        new_kid = ring.rotate()
        later = time.time() + 900 + MARGIN_S + 1
        assert [k.kid for k in ring.published(now=later)] == [new_kid]
        assert old_kid in {k.kid for k in ring.published()}

    def test_a_rotation_by_another_process_is_picked_up(self, tmp_path: Path) -> None:
        serving = KeyRing(tmp_path, token_ttl_s=900)
        serving.current()
        time.sleep(1.01)
        new_kid = KeyRing(tmp_path, token_ttl_s=900).rotate()
        assert serving.current().kid == new_kid


class TestKeysCommand:
    def test_rotate_and_list_as_the_runbook_does(self, tmp_path: Path) -> None:
        import os
        import subprocess
        import sys

        env = {**os.environ, "AUTH_KEYS_DIR": str(tmp_path / "keys")}
        cmd = str(Path(sys.executable).parent / "auth-keys")
        first = subprocess.run([cmd, "ensure"], env=env, capture_output=True, text=True, check=True).stdout
        time.sleep(1.01)
        rotated = subprocess.run([cmd, "rotate"], env=env, capture_output=True, text=True, check=True).stdout
        listing = subprocess.run([cmd, "list"], env=env, capture_output=True, text=True, check=True).stdout
        old_kid = first.split(":", 1)[1].strip()
        new_kid = rotated.split(":", 1)[1].strip()
        assert listing.splitlines() == [f"{new_kid}\tsigning", f"{old_kid}\tpublished"]


def pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def kid_at(created: float) -> str:
    return f"{int(created)}-{secrets.token_hex(4)}"


def keys_command(*args: str, keys_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTH_KEYS_DIR": str(keys_dir)}
    cmd = str(Path(sys.executable).parent / "auth-keys")
    return subprocess.run([cmd, *args], env=env, capture_output=True, text=True, check=False)


class TestDelayedActivation:
    def test_a_key_is_published_at_once_and_signs_from_its_activation_time(self, tmp_path: Path) -> None:
        ring = KeyRing(tmp_path, token_ttl_s=900)
        issuer = TokenIssuer(ring, issuer="iss", audience="aud", ttl_s=900)
        old = ring.current()
        new_kid = ring.rotate(activate_in_s=300)
        created = int(new_kid.split("-", 1)[0])
        assert created - time.time() == pytest.approx(300, abs=2)
        # Published (verifiers fetch it now), but the old key still signs.
        assert {k["kid"] for k in ring.jwks()["keys"]} == {old.kid, new_kid}
        assert [k.kid for k in ring.pending()] == [new_kid]
        assert ring.current().kid == old.kid
        token = issuer.issue(7)
        assert jwt.get_unverified_header(token)["kid"] == old.kid
        assert verifier_for(ring).verify(token).user_id == 7
        # From its activation time it signs, and the old key stays until its tokens expire.
        assert ring.current(now=created - 1).kid == old.kid
        assert ring.current(now=created).kid == new_kid
        assert ring.pending(now=created) == []
        assert {k.kid for k in ring.published(now=created + 900)} == {old.kid, new_kid}
        assert [k.kid for k in ring.published(now=created + 900 + MARGIN_S)] == [new_kid]

    def test_pending_keys_all_stay_published_and_the_newest_active_one_signs(self, tmp_path: Path) -> None:
        now = time.time()
        kids = [kid_at(now - 5000), kid_at(now - 10), kid_at(now + 100), kid_at(now + 200)]
        for kid in kids:
            (tmp_path / f"{kid}.pem").write_bytes(pem())
        ring = KeyRing(tmp_path, token_ttl_s=900)
        assert ring.current(now).kid == kids[1]
        assert [k.kid for k in ring.pending(now)] == kids[2:]
        # Newest first; the first key's successor has signed for 10 s: its tokens may live on.
        assert [k.kid for k in ring.published(now)] == kids[::-1]
        assert [k.kid for k in ring.published(now + 5000)] == [kids[3]]

    def test_a_first_key_not_active_yet_signs_anyway(self, tmp_path: Path) -> None:
        kid = KeyRing(tmp_path, token_ttl_s=900).rotate(activate_in_s=600)
        ring = KeyRing(tmp_path, token_ttl_s=900)
        assert ring.current().kid == kid  # no older key could sign instead
        assert ring.pending() == []

    def test_list_shows_pending_keys_and_rotate_writes_to_another_folder(self, tmp_path: Path) -> None:
        service_dir, local = tmp_path / "service", tmp_path / "local"
        first = keys_command("ensure", keys_dir=local).stdout.split(":", 1)[1].strip()
        rotated = keys_command("rotate", "--dir", str(local), "--activate-in", "600", keys_dir=service_dir)
        assert rotated.returncode == 0, rotated.stderr
        new_kid = rotated.stdout.split(":", 1)[1].strip()
        assert (local / f"{new_kid}.pem").stat().st_mode & 0o777 == 0o600
        assert "published now, signs from " in rotated.stderr
        assert not service_dir.exists()  # --dir wins over AUTH_KEYS_DIR
        listing = keys_command("list", "--dir", str(local), keys_dir=service_dir).stdout.splitlines()
        activation = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(new_kid.split("-", 1)[0])))
        assert listing == [f"{new_kid}\tpending\tsigns from {activation}", f"{first}\tsigning"]

    def test_a_negative_activation_is_refused(self, tmp_path: Path) -> None:
        result = keys_command("rotate", "--activate-in", "-5", keys_dir=tmp_path)
        assert result.returncode == 2
        assert "--activate-in must not be negative" in result.stderr
        assert list(tmp_path.glob("*.pem")) == []  # nothing made


class SecretVolume:
    """A folder as kubelet mounts a Secret: the files in a timestamped folder, `..data` a
    link to it, and one link per file to `..data/<name>`; an update writes a new
    timestamped folder, swaps `..data` atomically (rename), then adds and removes links."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.updates = 0

    def publish(self, files: dict[str, bytes]) -> None:
        self.updates += 1
        stamp = f"..2024_05_01_12_00_{self.updates:02d}.{secrets.randbelow(10**9)}"
        data = self.root / stamp
        data.mkdir()
        for name, content in files.items():
            (data / name).write_bytes(content)
            (data / name).chmod(0o440)  # defaultMode 0440
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.symlink(stamp, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")  # the atomic swap
        self.swapped()
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)
        for link in self.root.iterdir():
            if not link.name.startswith(".") and link.name not in files:
                link.unlink()
        if old:
            shutil.rmtree(self.root / old)

    def swapped(self) -> None:
        """Called between the swap of ..data and the links' update (see the tests)."""


class TestASecretVolume:
    def test_an_update_of_the_secret_is_picked_up_and_dot_files_are_never_keys(self, tmp_path: Path) -> None:
        volume = SecretVolume(tmp_path / "keys")
        now = time.time()
        first, second = kid_at(now - 3000), kid_at(now - 1)
        stray = {".hidden.pem": pem(), "..tmp.pem": pem()}  # dot files: never keys
        volume.publish({f"{first}.pem": pem(), **stray})
        assert os.path.islink(volume.root / f"{first}.pem")
        ring = KeyRing(volume.root, token_ttl_s=900)
        assert [k.kid for k in ring.all()] == [first]
        assert ring.current().kid == first

        seen_mid_update: list[str] = []
        volume.swapped = lambda: seen_mid_update.extend(k.kid for k in ring.all())  # type: ignore[method-assign]
        volume.publish({f"{first}.pem": (volume.root / f"{first}.pem").read_bytes(), f"{second}.pem": pem(), **stray})
        assert seen_mid_update == [first]  # the swap alone: the new key's link is not there yet
        assert [k.kid for k in ring.all()] == [first, second]  # no restart: the folder changed
        assert ring.current().kid == second
        assert {k["kid"] for k in ring.jwks()["keys"]} == {first, second}
        assert not (volume.root / "..data_tmp").exists()

    def test_a_key_removed_from_the_secret_leaves_without_an_error(self, tmp_path: Path) -> None:
        volume = SecretVolume(tmp_path / "keys")
        now = time.time()
        old, new = kid_at(now - 3000), kid_at(now - 2000)
        volume.publish({f"{old}.pem": pem(), f"{new}.pem": pem()})
        ring = KeyRing(volume.root, token_ttl_s=900)
        assert len(ring.all()) == 2
        dangling: list[list[str]] = []
        volume.swapped = lambda: dangling.append([k.kid for k in ring.all()])  # type: ignore[method-assign]
        volume.publish({f"{new}.pem": (volume.root / f"{new}.pem").read_bytes()})
        assert dangling == [[new]]  # old.pem's link points nowhere until kubelet removes it
        assert [k.kid for k in ring.all()] == [new]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Make a folder read-only as a Secret volume is: a read-only bind mount as root (who
    writes anywhere else), else mode 0555."""
    mounted: list[Path] = []
    changed: list[Path] = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            changed.append(folder)
            return folder
        target = tmp_path / f"ro-{len(mounted)}"
        target.mkdir()
        bind = subprocess.run(["mount", "--bind", str(folder), str(target)], capture_output=True, check=False)
        if bind.returncode != 0:
            pytest.skip(f"no read-only folder for root here: {bind.stderr.decode().strip()}")
        mounted.append(target)
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, check=False)
        if remount.returncode != 0:
            pytest.skip(f"no read-only folder for root here: {remount.stderr.decode().strip()}")
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", str(target)], check=True)
    for folder in changed:
        folder.chmod(0o755)


class TestAReadOnlyFolder:
    def test_with_keys_it_only_reads_them(self, tmp_path: Path, read_only: Callable[[Path], Path]) -> None:
        source = tmp_path / "secret"
        source.mkdir()
        kid = kid_at(time.time() - 10)
        (source / f"{kid}.pem").write_bytes(pem())
        folder = read_only(source)
        ring = KeyRing(folder, token_ttl_s=900)
        assert ring.current().kid == kid
        assert sorted(p.name for p in folder.iterdir()) == [f"{kid}.pem"]  # no .lock, nothing made
        result = keys_command("rotate", keys_dir=folder)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert f"auth-keys: cannot write to {folder}" in result.stderr
        assert "--dir PATH" in result.stderr

    def test_empty_it_is_a_clear_error_not_a_traceback(
        self, tmp_path: Path, read_only: Callable[[Path], Path], redis_url: str
    ) -> None:
        source = tmp_path / "secret"
        source.mkdir()
        (source / "..data").mkdir()  # a Secret volume's entries, but no key
        folder = read_only(source)
        with pytest.raises(NoSigningKey, match=r"no signing key in .* and none can be made there"):
            KeyRing(folder, token_ttl_s=900).current()
        result = keys_command("ensure", keys_dir=folder)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert f"auth-keys: no signing key in {folder} and none can be made there" in result.stderr
        assert "auth-keys rotate --dir PATH" in result.stderr
        settings = Settings(
            database_url="sqlite://", redis_url=redis_url, keys_dir=str(folder), service_token=SERVICE_TOKEN
        )
        with pytest.raises(NoSigningKey), TestClient(create_app(settings)):
            pass  # the service does not start, saying why

    def test_a_folder_of_unusable_files_is_a_clear_error(self, tmp_path: Path) -> None:
        (tmp_path / "not-a-kid.pem").write_bytes(pem())
        (tmp_path / f"{kid_at(time.time())}.pem").write_bytes(b"garbage")
        with pytest.raises(NoSigningKey, match=r"no usable signing key in .* \(2 files ignored, see the log\)"):
            KeyRing(tmp_path, token_ttl_s=900).current()
        assert len(list(tmp_path.glob("*.pem"))) == 2  # and no key made beside them
