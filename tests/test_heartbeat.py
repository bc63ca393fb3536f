"""The lease heartbeat's scheduling, with a real thread and short intervals.

What it does to real claims (a slow owner keeps its key, a killed worker's key expires one lease
after its last renewal) is proven across server processes in test_concurrency.py.
"""

from __future__ import annotations

import gc
import threading
import time

from django_idempotency.heartbeat import Heartbeat

BOUND = 5.0  # seconds any wait may take before the test fails


class Beating:
    def __init__(self, every: float, *, answer: bool = True, fail: bool = False) -> None:
        self.renew_every = every
        self.answer = answer
        self.fail = fail
        self.beats: list[float] = []
        self.event = threading.Event()

    def renew(self) -> bool:
        self.beats.append(time.monotonic())
        self.event.set()
        if self.fail:
            raise RuntimeError("store exploded")
        return self.answer


def _wait_for(condition: object) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_tracked_claim_is_renewed_every_third_of_its_lease() -> None:
    heartbeat = Heartbeat()
    flight = Beating(0.05)
    started = time.monotonic()
    heartbeat.track(flight)
    _wait_for(lambda: len(flight.beats) >= 3)
    heartbeat.untrack(flight)
    assert flight.beats[0] - started >= 0.05
    gaps = [b - a for a, b in zip(flight.beats, flight.beats[1:], strict=False)]
    assert all(gap >= 0.04 for gap in gaps), gaps


def test_a_short_request_is_never_renewed() -> None:
    heartbeat = Heartbeat()
    flight = Beating(0.2)
    heartbeat.track(flight)
    heartbeat.untrack(flight)
    time.sleep(0.4)
    assert flight.beats == []
    assert heartbeat.tracked() == 0


def test_a_shorter_lease_wakes_the_sleeping_thread() -> None:
    heartbeat = Heartbeat()
    slow = Beating(30)
    heartbeat.track(slow)
    time.sleep(0.05)  # the thread now sleeps until the slow claim is due
    fast = Beating(0.05)
    heartbeat.track(fast)
    assert fast.event.wait(BOUND)
    assert slow.beats == []


def test_a_lost_claim_stops_being_renewed() -> None:
    heartbeat = Heartbeat()
    flight = Beating(0.02, answer=False)
    heartbeat.track(flight)
    _wait_for(lambda: heartbeat.tracked() == 0)
    time.sleep(0.1)
    assert len(flight.beats) == 1


def test_a_failing_renewal_is_retried_and_does_not_stop_the_thread() -> None:
    heartbeat = Heartbeat()
    failing = Beating(0.02, fail=True)
    healthy = Beating(0.02)
    heartbeat.track(failing)
    heartbeat.track(healthy)
    _wait_for(lambda: len(failing.beats) >= 2 and len(healthy.beats) >= 2)
    heartbeat.untrack(failing)
    heartbeat.untrack(healthy)


def test_a_dropped_flight_is_forgotten_once_collected() -> None:
    heartbeat = Heartbeat()
    flight = Beating(0.05)
    heartbeat.track(flight)
    del flight
    gc.collect()
    _wait_for(lambda: heartbeat.tracked() == 0)
