"""The lease heartbeat: while a protected request runs, its claim's lease keeps moving forward.

Without it the lease has to outlast the slowest view, or a live slow request is taken over and
runs twice. With it, the lease only measures how long after a crash a retry waits: one daemon
thread per process renews every in-flight claim of the process each third of its lease, fenced
by the owner token, and a killed worker's claim expires one lease after its last renewal.

A request that ends before a third of its lease (nearly all of them) costs a dictionary insert
and removal under a lock; the thread never touches it. Claims are held through weak references,
so a flight that an entry point dropped without settling stops being renewed once it is
garbage-collected instead of holding its key forever.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger("django_idempotency")

#: How long the idle thread sleeps when it has nothing to renew; a new claim with a shorter
#: lease wakes it early.
IDLE_SECONDS = 60.0


class Renewable(Protocol):
    #: Seconds between renewals: a third of the lease.
    renew_every: float

    def renew(self) -> bool:
        """Extend the lease; False when the claim is gone and renewing should stop."""


class Heartbeat:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._wake = threading.Condition(threading.Lock())
        self._due: dict[int, tuple[float, weakref.ref[Renewable]]] = {}
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def track(self, flight: Renewable) -> None:
        due = self._clock() + flight.renew_every
        with self._wake:
            self._start_if_needed()
            self._due[id(flight)] = (due, weakref.ref(flight))
            if due < self._wake_at:
                self._wake.notify()

    def untrack(self, flight: Renewable) -> None:
        with self._wake:
            self._due.pop(id(flight), None)

    def tracked(self) -> int:
        with self._wake:
            return len(self._due)

    def _start_if_needed(self) -> None:
        # A forked worker (gunicorn --preload) inherits the registry but not the thread.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._due.clear()
            self._thread = None
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="django-idempotency-heartbeat", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                now = self._clock()
                ready = [(key, ref) for key, (due, ref) in self._due.items() if due <= now]
                if not ready:
                    self._wake_at = min(
                        (due for due, _ in self._due.values()), default=now + IDLE_SECONDS
                    )
                    self._wake.wait(self._wake_at - now)
                    self._wake_at = float("inf")
                    continue
            for key, ref in ready:
                self._beat(key, ref)
            _close_connections()

    def _beat(self, key: int, ref: weakref.ref[Renewable]) -> None:
        flight = ref()
        keep = False
        if flight is not None:
            try:
                keep = flight.renew()
            except Exception:  # a renewal must never kill the thread that serves every claim
                logger.exception("Lease renewal failed")
                keep = True
        with self._wake:
            entry = self._due.get(key)
            if entry is None or entry[1] is not ref:
                return  # settled (or replaced) while it was being renewed
            if keep and flight is not None:
                self._due[key] = (self._clock() + flight.renew_every, ref)
            else:
                del self._due[key]


def _close_connections() -> None:
    # The thread lives as long as the process, and its database connections with it: drop those
    # that broke or aged out, as Django does at the end of each request.
    from django.db import close_old_connections

    close_old_connections()


heartbeat = Heartbeat()
