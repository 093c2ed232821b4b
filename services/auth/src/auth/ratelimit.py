"""The per-client-IP limit of `POST /token`, in auth rather than at the gateway.

The gateway limits `POST /signup` per IP itself, but not `POST /token`: there the auth
service answers its own 429 (`account_locked`), and a Traefik errors middleware cannot tell
that problem document from the limiter's plain-text 429, so it would overwrite one or leave
the other as text. Here both are problem documents: `rate_limited` and `account_locked`.

The bucket is a GCRA (the token bucket Traefik's limiter implements: `average` per second,
`burst` at once) in Redis, shared by every auth replica. The client is the address the
gateway saw: the gateway appends its TCP peer to X-Forwarded-For after dropping what an
untrusted client sent, so the rightmost entry is that peer, and `client_ip_depth` entries
further left are the addresses trusted proxies in front of it vouch for (GATEWAY_IP_DEPTH's
meaning). Auth is reachable only through the gateway and the internal network, never from
clients directly. Redis down: the limit is skipped and logged, as the account lockout is,
so logins keep working (each password check still costs a bcrypt hash).
"""

from __future__ import annotations

import hashlib
import logging

import redis
from starlette.requests import Request

from svckit.problems import ProblemError

log = logging.getLogger("auth.ratelimit")

# KEYS[1]: the bucket (its theoretical arrival time, ms). ARGV: interval ms, burst.
# Returns 0 (allowed) or the milliseconds to wait.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local over = new_tat - now - interval * burst
if over > 0 then return over end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return 0
"""


class RateLimited(ProblemError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            f"Too many requests from this address; try again in {retry_after_s} second"
            f"{'' if retry_after_s == 1 else 's'}.",
            headers={"Retry-After": str(retry_after_s)},
        )


def client_ip(request: Request, depth: int) -> str:
    forwarded = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    if forwarded:
        return forwarded[max(0, len(forwarded) - 1 - depth)]
    return request.client.host if request.client else ""


class IpRateLimit:
    def __init__(self, client: redis.Redis, *, name: str, average: int, burst: int, depth: int = 0) -> None:
        self.redis = client
        self.name = name
        self.interval_ms = max(1, 1000 // max(1, average))
        self.burst = max(1, burst)
        self.depth = depth
        self._take = client.register_script(_TAKE)

    def check(self, request: Request) -> None:
        """Take one request from this client's bucket, or raise a 429 `rate_limited`."""
        ip = client_ip(request, self.depth)
        digest = hashlib.sha256(ip.encode()).hexdigest()[:32]  # no addresses in Redis keys
        try:
            wait_ms = int(self._take(keys=[f"auth:rate:{self.name}:{digest}"], args=[self.interval_ms, self.burst]))
        except redis.RedisError:
            log.error("%s rate limit skipped: Redis unavailable", self.name)
            return
        if wait_ms > 0:
            raise RateLimited(max(1, -(-wait_ms // 1000)))
