"""`notifier-dlq`: list the dead-lettered notifier messages, and replay one or all of them.

    notifier-dlq list
    notifier-dlq replay EMAIL_ID [EMAIL_ID ...]
    notifier-dlq replay --all

A replayed message starts with a fresh retry budget. Replaying an email that was in fact
delivered sends nothing: its id is marked sent (and is Brevo's idempotencyKey).

This queue lives in Redis and goes with it (a flush, a failover). The durable record is the
producing service's outbox: `auth-relay dead-letters` / `wallet-relay dead-letters` list
and replay from the database (svckit.deadletters); an email replayed here and delivered
turns its outbox row from dead-lettered to sent.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

import dramatiq
import redis

from notifier.broker import setup_broker
from notifier.config import get_settings
from svckit.messages import QUEUE

NAMESPACE = "dramatiq"


def _keys() -> tuple[str, str]:
    xq = f"{NAMESPACE}:{QUEUE}.XQ"
    return xq, f"{xq}.msgs"


def dead_letters(client: redis.Redis) -> list[tuple[str, dramatiq.Message, float]]:  # type: ignore[type-arg]
    """(redis id, message, dead-lettered at) for every message in the dead-letter queue."""
    xq, msgs = _keys()
    out = []
    for redis_id, score in client.zrange(xq, 0, -1, withscores=True):
        raw = client.hget(msgs, redis_id)
        if raw is not None:
            key = redis_id.decode() if isinstance(redis_id, bytes) else str(redis_id)
            out.append((key, dramatiq.Message.decode(raw), score))
    return out


def replay(broker: dramatiq.Broker, client: redis.Redis, wanted: set[str] | None) -> int:
    """Re-enqueue the chosen dead letters (all when `wanted` is None); returns how many."""
    xq, msgs = _keys()
    count = 0
    for redis_id, message, _ in dead_letters(client):
        if wanted is not None and message.message_id not in wanted and redis_id not in wanted:
            continue
        fresh = message.copy(options={"retries": 0, "traceback": None})
        broker.enqueue(fresh)
        pipe = client.pipeline()
        pipe.zrem(xq, redis_id)
        pipe.hdel(msgs, redis_id)
        pipe.execute()
        count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="notifier-dlq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the dead-lettered messages")
    rep = sub.add_parser("replay", help="send dead-lettered messages again")
    rep.add_argument("ids", nargs="*", help="email ids (the message ids shown by list)")
    rep.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)
    broker = setup_broker(get_settings())
    client = broker.client
    if args.command == "list":
        letters = dead_letters(client)
        for _, message, score in letters:
            when = datetime.fromtimestamp(score / 1000, UTC).isoformat(timespec="seconds")
            error = (message.options.get("traceback") or "").strip().splitlines()[-1:] or ["?"]
            print(
                f"{message.message_id}\t{message.actor_name}\tretries={message.options.get('retries', 0)}"
                f"\tdead since {when}\t{error[0]}"
            )
        print(f"{len(letters)} dead-lettered message(s)")
        return
    if not args.all and not args.ids:
        parser.error("replay needs email ids or --all")
    count = replay(broker, client, None if args.all else set(args.ids))
    print(f"replayed {count} message(s)")
    sys.exit(0 if count or args.all else 1)


if __name__ == "__main__":
    main()
