"""What protection costs per request, as ratios against a bare DRF view in the same run.

Run from the repository root, on any backend of the test matrix::

    .venv/bin/python bench/request_bench.py                                   # SQLite, ORM store
    IDEMPOTENCY_TEST_DB=postgres .venv/bin/python bench/request_bench.py      # PostgreSQL
    IDEMPOTENCY_TEST_STORE=redis .venv/bin/python bench/request_bench.py      # Redis cache store

It creates a throw-away test database, then times, through Django's test client and in one
process, the same payment endpoint four ways: a bare DRF ``APIView`` (no mixin), the mixin
without a key (the pass-through path), the mixin with a fresh key per request (claim, view,
completion), and the mixin replaying one stored key (the view does not run). Each variant runs
``--rounds`` rounds of ``--requests`` requests, interleaved so that machine noise hits them all
alike; the median round is reported.

The bare view is the worst case for these ratios: one anonymous INSERT in autocommit, one round
trip and one commit. Targets: the pass-through path (no key) and a replay (the view does not
run; one SELECT or one Redis call) within 1.10x of it; a fresh key within 2.0x on the Redis store
and 3.5x on the ORM store, whose fresh path is six round trips and two commits (SELECT, the
claim's INSERT committed on its own so that other workers see it, then BEGIN, the view's INSERT,
the completing UPDATE and COMMIT): the price of a claim that holds across processes. The exit
status is non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402
from django.urls import path  # noqa: E402
from rest_framework.request import Request  # noqa: E402
from rest_framework.views import APIView  # noqa: E402

from tests.testapp import urls, views  # noqa: E402

FRESH_TARGET = {"db": 3.5, "redis": 2.0}


class BarePaymentView(APIView):
    """The baseline: the same handler as the protected view, without the mixin."""

    def post(self, request: Request) -> object:
        return views.drf_response(request)


urls.urlpatterns.append(path("bench/bare/", BarePaymentView.as_view()))


def timed(send: Callable[[int], object], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        send(i)
    return (time.perf_counter() - start) / count


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        client = Client()
        body = json.dumps({"amount": 10})

        def post(url: str, key: str | None) -> object:
            headers = {"Idempotency-Key": key} if key else {}
            response = client.post(url, body, "application/json", headers=headers)
            assert response.status_code == 201, response.content
            return response

        post("/mixin/payments/", "replayed-key")
        run = [0]

        variants: dict[str, Callable[[int], object]] = {
            "bare DRF view": lambda i: post("/bench/bare/", None),
            "no key": lambda i: post("/mixin/payments/", None),
            "fresh key": lambda i: post("/mixin/payments/", f"fresh-{run[0]}-{i}"),
            "replay": lambda i: post("/mixin/payments/", "replayed-key"),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for send in variants.values():
            timed(send, 20)  # warm-up
        for round_number in range(args.rounds):
            run[0] = round_number
            for name, send in variants.items():
                samples[name].append(timed(send, args.requests))
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)

    from django.conf import settings

    print(
        f"backend: db={settings.DB_BACKEND} store={settings.STORE_BACKEND}; "
        f"{args.rounds} rounds x {args.requests} requests, median round"
    )
    targets = {"no key": 1.10, "fresh key": FRESH_TARGET[settings.STORE_BACKEND], "replay": 1.10}
    bare = statistics.median(samples["bare DRF view"])
    failed = False
    for name, values in samples.items():
        median = statistics.median(values)
        ratio = median / bare
        target = targets.get(name)
        verdict = ""
        if target is not None:
            ok = ratio <= target
            failed |= not ok
            verdict = f"  (target <= {target:.2f}x: {'ok' if ok else 'MISSED'})"
        print(f"  {name:14} {median * 1e6:8.0f} us/request  {ratio:5.2f}x{verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
