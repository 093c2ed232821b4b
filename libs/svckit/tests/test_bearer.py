"""Only the canonical `Authorization: Bearer <jwt>` is a credential (what the gateway routes)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st

from svckit.app import base_app
from svckit.deps import UserDep
from svckit.jwt import BEARER, Claims, InvalidToken, bearer_token

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiI3In0.c2lnbmF0dXJl"
SEGMENT = "a" * 1000


class TestBearerToken:
    @pytest.mark.parametrize(
        "token",
        [TOKEN, "a.b.c", "A-_z.0_9.x-y", f"{SEGMENT}.{SEGMENT}.{SEGMENT}"],
        ids=["jwt", "short", "alphabet", "max"],
    )
    def test_the_canonical_form_is_a_token(self, token: str) -> None:
        assert bearer_token(f"Bearer {token}") == token

    @pytest.mark.parametrize(
        "header",
        [
            None,
            "",
            "Bearer",
            "Bearer ",
            f"bearer {TOKEN}",
            f"BEARER {TOKEN}",
            f"BeArEr {TOKEN}",
            f"Bearer  {TOKEN}",
            f"Bearer\t{TOKEN}",
            f" Bearer {TOKEN}",
            f"Bearer {TOKEN} ",
            f"Bearer {TOKEN}\n",
            f"Bearer {TOKEN} extra",
            f"Basic {TOKEN}",
            f"Bearer{TOKEN}",
            "Bearer a.b",
            "Bearer a.b.c.d",
            "Bearer a.b.",
            "Bearer .b.c",
            "Bearer a..c",
            "Bearer a+b.c.d=",
            "Bearer a/b.c.d",
            "Bearer a.b.cé",
            f"Bearer {SEGMENT}a.b.c",
            f"Bearer a.b.{SEGMENT}a",
        ],
    )
    def test_every_other_spelling_is_not(self, header: str | None) -> None:
        assert bearer_token(header) is None


class FakeVerifier:
    def remembered(self, token: str) -> Claims | None:
        return None

    def verify(self, token: str) -> Claims:
        if token != TOKEN:
            raise InvalidToken("unknown")
        return Claims(user_id=7, jti="j", expires_at=2**40, raw={})


@pytest.fixture
def client() -> TestClient:
    app: FastAPI = base_app("test", log_level="INFO")
    app.state.verifier = FakeVerifier()

    @app.get("/me")
    def me(user: UserDep) -> dict[str, int]:
        return {"id": user.user_id}

    return TestClient(app)


class TestCurrentUser:
    def test_the_canonical_header_authenticates(self, client: TestClient) -> None:
        assert client.get("/me", headers={"Authorization": f"Bearer {TOKEN}"}).json() == {"id": 7}

    @pytest.mark.parametrize("header", [f"bearer {TOKEN}", f"Bearer  {TOKEN}", f"BEARER {TOKEN}"])
    def test_another_spelling_is_401(self, client: TestClient, header: str) -> None:
        response = client.get("/me", headers={"Authorization": header})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["code"] == "unauthorized"

    @pytest.mark.parametrize(
        "values", [[f"Bearer {TOKEN}", f"Bearer {TOKEN}"], ["junk", f"Bearer {TOKEN}"], [f"Bearer {TOKEN}", "junk"]]
    )
    def test_two_authorization_headers_are_401(self, client: TestClient, values: list[str]) -> None:
        response = client.get("/me", headers=[("Authorization", v) for v in values])
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"


# --- the gateway's rule (gateway/dynamic/routes.yml) admits to the money limit exactly this ---

ROUTES = Path(__file__).resolve().parents[3] / "gateway" / "dynamic" / "routes.yml"


@functools.cache
def gateway_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """`$bearer` and `$notBearer` of the routing template, as Python regexps (for these
    constructs, and for values without a line break, Go's syntax and Python's agree)."""
    text = ROUTES.read_text()
    raw = dict(re.findall(r"\{\{- \$(\w+) := `([^`]*)` \}\}", text))
    fmt = re.search(r"\{\{- \$bearer := printf `([^`]*)` \$segment \$segment \$segment \}\}", text)
    assert fmt is not None
    return re.compile(fmt.group(1).replace("%s", raw["segment"])), re.compile(raw["notBearer"])


_segments = st.one_of(
    st.text(alphabet="aZ9_-", max_size=3),
    st.sampled_from([999, 1000, 1001]).map(lambda n: "a" * n),
    st.text(alphabet="a.+/= é\t", max_size=3),
)
_values = st.one_of(
    st.builds(
        lambda prefix, segments, sep: prefix + sep.join(segments),
        st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Bearer  ", "Bearer", "Bear", "", "Basic ", " Bearer "]),
        st.lists(_segments, max_size=4),
        st.sampled_from([".", ".", "..", " "]),
    ),
    st.text(max_size=12).filter(lambda v: "\n" not in v and "\r" not in v),
)


@pytest.mark.skipif(not ROUTES.exists(), reason="needs the repository's gateway/ (svckit installed alone)")
@settings(max_examples=300, deadline=None)
@given(_values)
@example("Bearer a.b.c")
@example("Bearer a.b.c.d")
@example("Bearer  a.b.c")
@example("Bearer a..c")
@example("Bearer .b.c")
@example("Bearer a.b.")
@example("Bearer")
@example(f"Bearer {SEGMENT}.{SEGMENT}.{SEGMENT}")
@example(f"Bearer {SEGMENT}a.b.c")
def test_the_gateway_limits_exactly_the_headers_svckit_accepts(value: str) -> None:
    bearer, not_bearer = gateway_patterns()
    limited = bearer.search(value) is not None
    assert (not_bearer.search(value) is None) == limited, value  # $notBearer is its exact complement
    assert (BEARER.fullmatch(value) is not None) == limited, value
