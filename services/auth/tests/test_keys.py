from __future__ import annotations

import time
from pathlib import Path

from auth.keys import MARGIN_S, KeyRing
from auth.security import TokenIssuer
from svckit.jwt import JWKSVerifier


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
