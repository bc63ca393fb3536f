"""What an async view pays for protection on the Redis store, on the loop and through threads.

Run from the repository root, with the shared Redis up::

    .venv/bin/python bench/async_bench.py
    .venv/bin/python bench/async_bench.py --rounds 5 --requests 400 --concurrency 1 50

Requests go through Django's ASGI handler on one long-lived event loop, as under an ASGI server
(uvicorn, daphne), minus the socket. The view does no I/O of its own, so that what is measured is
the layer: ``bare`` (an unprotected async view), ``loop`` (``@idempotent`` on
``IDEMPOTENCY_STORE = "redis"``, its claim and completion awaited on the loop's own
``redis.asyncio`` client) and ``threads`` (the same with the store's synchronous client run
through ``sync_to_async`` for every step, which is how every async view ran before the loop
client and how it still runs on a store without one). The scope is a constant, so no session is
read.

For each concurrency (requests in flight at once on the loop) and path (a fresh key per request,
a replay of one stored key) it prints requests per second over ``--rounds`` rounds, the median
round, and its ratio to ``bare``. Rounds of every variant interleave, so a drift of the machine
hits each alike. A thread-sensitive ``sync_to_async`` runs on one shared thread, so ``threads``
serialises every store call of the process: the gap grows with the concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("bare", "loop", "threads")
PATHS = ("fresh key", "replay")


async def send(handler: Any, url: str, key: str | None) -> int:
    """One POST through the ASGI handler; returns the status."""
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"idempotency-key", key.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": url,
        "raw_path": url.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # a client that stays connected
        sent = True
        return {"type": "http.request", "body": b'{"amount": 10}', "more_body": False}

    status = 0

    async def reply(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await handler(scope, receive, reply)
    return status


async def rate(
    request: Callable[[int], Awaitable[int]], count: int, concurrency: int, expect: int
) -> float:
    """Requests per second for ``count`` requests, ``concurrency`` in flight at a time."""
    started = time.perf_counter()
    for first in range(0, count, concurrency):
        batch = range(first, min(count, first + concurrency))
        statuses = await asyncio.gather(*(request(i) for i in batch))
        if any(s != expect for s in statuses):
            raise SystemExit(f"unexpected answers {sorted(set(statuses))}, wanted {expect}")
    return count / (time.perf_counter() - started)


async def measure(args: argparse.Namespace) -> dict[tuple[int, str, str], list[float]]:
    from django.core.handlers.asgi import ASGIHandler

    from django_idempotency.storage import get_storage
    from django_idempotency.storage.redis import RedisStorage

    handler = ASGIHandler()
    store = get_storage()
    assert isinstance(store, RedisStorage), "the async bench runs on IDEMPOTENCY_STORE = 'redis'"
    native = RedisStorage.runs_on_loop
    replay_key = str(uuid.uuid4())
    assert await send(handler, "/bench/async/ours/", replay_key) == 201
    results: dict[tuple[int, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for concurrency in args.concurrency:
            for variant in VARIANTS:
                # "threads" is the same store told that it has no client on this loop.
                RedisStorage.runs_on_loop = (  # type: ignore[method-assign]
                    native if variant == "loop" else (lambda self: False)
                )
                url = "/bench/async/bare/" if variant == "bare" else "/bench/async/ours/"
                for path in PATHS:
                    if path == "fresh key":

                        def request(i: int, url: str = url) -> Awaitable[int]:
                            return send(handler, url, str(uuid.uuid4()))
                    else:

                        def request(i: int, url: str = url) -> Awaitable[int]:
                            return send(handler, url, replay_key)

                    value = await rate(request, args.requests, concurrency, 201)
                    results.setdefault((concurrency, variant, path), []).append(value)
    RedisStorage.runs_on_loop = native  # type: ignore[method-assign]
    await store.aclose()
    return results


def report(results: dict[tuple[int, str, str], list[float]], args: argparse.Namespace) -> None:
    print(f"{'in flight':>9}  {'variant':8} {'path':10} {'req/s':>9} {'vs bare':>8}")
    for concurrency in args.concurrency:
        for path in PATHS:
            bare = statistics.median(results[(concurrency, "bare", path)])
            for variant in VARIANTS:
                value = statistics.median(results[(concurrency, variant, path)])
                print(
                    f"{concurrency:>9}  {variant:8} {path:10} {value:>9.0f} {value / bare:>7.2f}x"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    args = parser.parse_args()
    os.environ["IDEMPOTENCY_TEST_STORE"] = "redisstore"
    os.environ.setdefault("IDEMPOTENCY_TEST_DB", "sqlite")
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    import django

    django.setup()
    import redis
    from django.conf import settings
    from django.test import override_settings

    prefix = f"idem-async-bench-{uuid.uuid4().hex[:8]}:"
    try:
        # Django's own middleware runs each hook through sync_to_async under ASGI, several
        # thread hops per request that would bury what is measured here: none is installed.
        with override_settings(IDEMPOTENCY_REDIS_KEY_PREFIX=prefix, MIDDLEWARE=[]):
            results = asyncio.run(measure(args))
    finally:
        client = redis.Redis.from_url(settings.REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    print(f"store=redis (loop client) python={sys.version.split()[0]} rounds={args.rounds}")
    report(results, args)


if __name__ == "__main__":
    main()
