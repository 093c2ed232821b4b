"""The service credential: no service starts with a guessable one, and none accepts an empty one."""

from __future__ import annotations

import hmac

import pytest
from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from svckit.settings import DEV_SERVICE_TOKEN, BaseServiceSettings, InsecureServiceToken

GOOD = "q3J9x2Vf8LkPz0RtY7wNbC4mHs6uAeDg"  # 32 characters, as from `openssl rand -base64 24`


class SomeSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SOME_", extra="ignore")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOME_SERVICE_TOKEN", raising=False)
    monkeypatch.delenv("SOME_ALLOW_DEV_SERVICE_TOKEN", raising=False)


def test_settings_without_a_token_still_load_for_migrations_and_relays() -> None:
    assert SomeSettings().database_url  # only start-up of a service checks the token


class TestRefusesToStart:
    def test_with_the_default_token(self) -> None:
        with pytest.raises(InsecureServiceToken, match="SERVICE_TOKEN"):
            SomeSettings().require_service_token()

    @pytest.mark.parametrize(
        "token",
        ["", "short", "x" * 31, DEV_SERVICE_TOKEN, "change-me-to-a-long-random-string", "CHANGEME" * 5],
    )
    def test_with_an_empty_short_or_placeholder_token(self, monkeypatch: pytest.MonkeyPatch, token: str) -> None:
        monkeypatch.setenv("SOME_SERVICE_TOKEN", token)
        with pytest.raises(InsecureServiceToken, match="SERVICE_TOKEN") as caught:
            SomeSettings().require_service_token()
        if token:
            assert token not in str(caught.value)  # the refusal never prints the value read

    def test_an_empty_token_even_in_dev(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SOME_SERVICE_TOKEN", "")
        monkeypatch.setenv("SOME_ALLOW_DEV_SERVICE_TOKEN", "true")
        with pytest.raises(InsecureServiceToken, match="empty"):
            SomeSettings().require_service_token()


class TestStarts:
    def test_with_a_long_random_token(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SOME_SERVICE_TOKEN", GOOD)
        settings = SomeSettings()
        settings.require_service_token()
        assert settings.service_token.get_secret_value() == GOOD

    def test_with_the_default_when_dev_is_allowed_explicitly(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SOME_ALLOW_DEV_SERVICE_TOKEN", "true")
        settings = SomeSettings()
        settings.require_service_token()
        assert settings.service_token.get_secret_value() == DEV_SERVICE_TOKEN


class TestAcceptsServiceToken:
    @pytest.fixture
    def settings(self, monkeypatch: pytest.MonkeyPatch) -> SomeSettings:
        monkeypatch.setenv("SOME_SERVICE_TOKEN", GOOD)
        return SomeSettings()

    def test_only_the_configured_token(self, settings: SomeSettings) -> None:
        assert settings.accepts_service_token(GOOD)
        for wrong in (GOOD[:-1], GOOD + "x", GOOD.upper(), "nope"):
            assert not settings.accepts_service_token(wrong)

    @pytest.mark.parametrize("presented", [None, ""])
    def test_never_a_missing_or_empty_one(self, settings: SomeSettings, presented: str | None) -> None:
        assert not settings.accepts_service_token(presented)

    def test_nothing_when_the_configured_token_is_empty(self) -> None:
        # Start-up refuses this; the comparison refuses it on its own too.
        unchecked = SomeSettings(service_token=SecretStr(""))
        assert not unchecked.accepts_service_token("")

    def test_the_comparison_is_constant_time(self, settings: SomeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[tuple[bytes, bytes]] = []
        real = hmac.compare_digest

        def recording(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        monkeypatch.setattr(hmac, "compare_digest", recording)
        assert not settings.accepts_service_token("nope")
        assert calls == [(b"nope", GOOD.encode())]
