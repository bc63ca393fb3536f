"""Requests per second under load: gunicorn with 4 sync workers, bare view, floor and ours.

Run from the repository root (``gunicorn`` comes with the ``test`` and ``bench`` extras)::

    .venv/bin/python bench/http_bench.py --backend postgres
    .venv/bin/python bench/http_bench.py --db postgres --store redis --duration 5

The script creates and migrates a throw-away database (as the test runner does), creates two
users with DRF tokens, starts gunicorn on 127.0.0.1 over ``bench.urls`` with the database's name
in ``IDEMPOTENCY_BENCH_DB_NAME``, and drives it with a bounded load generator: ``wrk`` when it is
installed (a Lua ``request()`` gives every request its own key), else a threaded Python client
(one ``http.client`` connection per thread). Each load runs ``--duration`` seconds (default 10) at
``--connections`` concurrent connections: the bare view; the floor and ours with a fresh key per
request; the floor and ours with one repeated key (stored before the load, so every request is a
replay); ours without a key. ``--rounds`` repeats the whole set, each round in a rotated order.
Afterwards gunicorn is stopped, the database dropped and this run's Redis records deleted.

Reported per load: requests per second, the 99th-percentile latency, non-2xx answers, and the
rate's ratio to the bare view's. Targets of issue 9, printed with ``ok`` or ``MISSED``: fresh keys
at least 0.75x bare's rate with the ORM store on PostgreSQL, 0.85x with the Redis store; one
repeated key at least 1.5x bare. ``--check`` makes a miss exit non-zero.

The load generator shares the machine with the server: on a 2-core machine wrk and four workers
compete for the same cores, so compare ratios within one run, not rates across machines. With the
Redis store, put the view's own table on PostgreSQL (``--db postgres --store redis``): on SQLite
the four workers queue for SQLite's single writer, and the run measures that queue.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

URLS = {"bare": "/bench/bare/", "floor": "/bench/floor/", "ours": "/bench/ours/"}
BODY = '{"amount": 10}'
LOADS = [
    ("bare", "no key"),
    ("floor", "fresh keys"),
    ("ours", "fresh keys"),
    ("floor", "one key"),
    ("ours", "one key"),
    ("ours", "no key"),
]
# (variant, load, lowest ratio of bare's rate, stores it applies to)
TARGETS = [
    ("ours", "fresh keys", 0.75, {"postgres"}),
    ("ours", "fresh keys", 0.85, {"redis"}),
    ("ours", "one key", 1.5, {"sqlite", "postgres", "mariadb", "redis"}),
]

WRK_SCRIPT = """
local authorization = "Token @TOKEN@"
local mode = "@MODE@"
local prefix = "@PREFIX@"
local body = '@BODY@'
local counter = 0
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

function request()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = authorization}
  if mode == "fresh keys" then
    headers["Idempotency-Key"] = prefix .. "-" .. thread_number .. "-" .. counter
  elseif mode == "one key" then
    headers["Idempotency-Key"] = prefix
  end
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "seconds": %f, "p50_us": %d, "p99_us": %d, "non_2xx": %d,'
    .. ' "socket_errors": %d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    non_2xx: int
    socket_errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(port: int, url: str, authorization: str, key: str | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json", "Authorization": authorization}
    if key is not None:
        headers["Idempotency-Key"] = key
    try:
        connection.request("POST", url, BODY, headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def wait_until_serving(port: int, server: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("gunicorn did not start listening in time")


def run_wrk(args: argparse.Namespace, port: int, url: str, token: str, mode: str, key: str) -> Load:
    """``key`` is the repeated key, or the prefix of the fresh ones."""
    script = (
        WRK_SCRIPT.replace("@TOKEN@", token)
        .replace("@MODE@", mode)
        .replace("@PREFIX@", key)
        .replace("@BODY@", BODY)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    try:
        command = [
            "wrk",
            f"--threads={args.threads}",
            f"--connections={args.connections}",
            f"--duration={args.duration}s",
            "--timeout=10s",
            f"--script={file.name}",
            f"http://127.0.0.1:{port}{url}",
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout  # noqa: S603
    finally:
        os.unlink(file.name)
    for line in output.splitlines():
        if line.startswith("BENCHJSON "):
            return Load(**json.loads(line.removeprefix("BENCHJSON ")))
    raise RuntimeError(f"wrk printed no summary:\n{output}")


def run_python(
    args: argparse.Namespace, port: int, url: str, token: str, mode: str, key: str
) -> Load:
    """The fallback: one thread per connection; the GIL makes it the slower generator."""
    latencies: list[list[float]] = [[] for _ in range(args.connections)]
    failures = [[0, 0] for _ in range(args.connections)]
    start = time.perf_counter()
    deadline = start + args.duration

    def worker(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/json", "Authorization": f"Token {token}"}
        if mode == "one key":
            headers["Idempotency-Key"] = key
        count = 0
        mine = latencies[number]
        while (began := time.perf_counter()) < deadline:
            count += 1
            if mode == "fresh keys":
                headers["Idempotency-Key"] = f"{key}-{number}-{count}"
            try:
                connection.request("POST", url, BODY, headers)
                response = connection.getresponse()
                response.read()
                if response.will_close:
                    connection.close()  # sync workers close every connection; reconnect
                if not 200 <= response.status < 300:
                    failures[number][0] += 1
            except (OSError, http.client.HTTPException):
                failures[number][1] += 1
                connection.close()
            mine.append(time.perf_counter() - began)
        connection.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    every = sorted(value for values in latencies for value in values)
    if not every:
        return Load(0, seconds, 0, 0, 0, sum(f[1] for f in failures))
    return Load(
        requests=len(every),
        seconds=seconds,
        p50_us=statistics.median(every) * 1e6,
        p99_us=every[min(len(every) - 1, int(0.99 * len(every)))] * 1e6,
        non_2xx=sum(f[0] for f in failures),
        socket_errors=sum(f[1] for f in failures),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_backend_arguments(parser)
    parser.add_argument("--duration", type=int, default=10, help="seconds per load")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = parser.parse_args()
    if args.duration > 60:
        parser.error("--duration is bounded at 60 seconds per load")
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    load_with = run_wrk if client == "wrk" else run_python
    common.setup(args)

    from django.conf import settings
    from django.db import connection
    from django.test.utils import setup_test_environment

    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    results: dict[tuple[str, str], list[Load]] = {load: [] for load in LOADS}
    log = tempfile.NamedTemporaryFile("w+", prefix="http-bench-gunicorn-", suffix=".log")  # noqa: SIM115
    server: subprocess.Popen[bytes] | None = None
    try:
        backend = common.describe_backend()
        label = common.store_label()
        if label == "redis" and connection.vendor == "sqlite":
            print(
                "note: the view's table is on SQLite, whose single writer serialises the workers;"
                " --db postgres measures the Redis store instead of that queue",
                file=sys.stderr,
            )
        principal = common.make_principals(1)[0]
        connection.close()
        port = free_port()
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "bench.settings",
            "IDEMPOTENCY_BENCH_DB_NAME": str(settings.DATABASES["default"]["NAME"]),
            "PYTHONPATH": str(common.ROOT),
        }
        server = subprocess.Popen(  # noqa: S603
            [
                sys.executable,
                "-m",
                "gunicorn",
                f"--workers={args.workers}",
                "--worker-class=sync",
                f"--bind=127.0.0.1:{port}",
                "--log-level=warning",
                "bench.wsgi:application",
            ],
            cwd=common.ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_until_serving(port, server)
        tag = uuid.uuid4().hex[:12]
        for variant, url in URLS.items():
            for _ in range(args.workers * 5):  # every worker connects and loads the code
                status = post(port, url, principal.authorization)
                assert status == 201, f"{variant} answered {status} while warming up"
        print(f"serving {backend} on 127.0.0.1:{port}: {args.workers} gunicorn sync workers")
        print(
            f"load: {client}, {args.connections} connections, {args.duration:g} s per load, "
            f"{args.rounds} round(s)"
        )
        order = list(LOADS)
        for round_number in range(args.rounds):
            for variant, mode in order:
                url = URLS[variant]
                key = f"{mode.replace(' ', '-')}-{variant}-{round_number}-{tag}"
                if mode == "one key":
                    # Stored before the load, so that every timed request is a replay.
                    assert post(port, url, principal.authorization, key) == 201
                load = load_with(args, port, url, principal.token, mode, key)
                results[(variant, mode)].append(load)
            order = order[1:] + order[:1]
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            if server.returncode not in (0, -15):
                log.seek(0)
                print(f"gunicorn exited with {server.returncode}:\n{log.read()}", file=sys.stderr)
        log.close()
        common.clear_redis()
        connection.close()
        connection.creation.destroy_test_db(old_name, verbosity=0)

    rates = {load: statistics.median(r.rate for r in runs) for load, runs in results.items()}
    bare = rates[("bare", "no key")]
    print(f"  {'variant':8} {'load':11} {'req/s':>8} {'p99 ms':>8} {'non-2xx':>8} {'x bare':>7}")
    lines = []
    for load in LOADS:
        runs = results[load]
        p99 = max(r.p99_us for r in runs) / 1000
        bad = sum(r.non_2xx + r.socket_errors for r in runs)
        ratio = rates[load] / bare
        lines.append((*load, f"{rates[load]:.0f}", f"{p99:.1f}", str(bad), f"{ratio:.2f}"))
        print(f"  {load[0]:8} {load[1]:11} {rates[load]:8.0f} {p99:8.1f} {bad:8d} {ratio:7.2f}")
    missed = False
    print("targets (issue 9):")
    for variant, mode, bound, stores in TARGETS:
        if label not in stores:
            continue
        ratio = rates[(variant, mode)] / bare
        ok = ratio >= bound
        missed |= not ok
        print(f"  {variant} {mode} >= {bound:.2f}x bare: {ratio:.2f}x {'ok' if ok else 'MISSED'}")
    if any(r.non_2xx or r.socket_errors for runs in results.values() for r in runs):
        print("some requests failed: the rates above include them", file=sys.stderr)
    if args.markdown:
        print(f"\n{backend}; {client}, {args.connections} connections, {args.duration:g} s\n")
        print("| variant | load | req/s | p99 ms | non-2xx | × bare |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for line in lines:
            print("| " + " | ".join(line) + " |")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
