"""``idempotent_function`` (issue 10): once per key for work no HTTP client retries.

Runs on every store of the matrix. The storms use real OS processes (``tests.function_worker``)
on the test database, and count both what ran (a shared append-only file) and what committed
(``Payment`` rows).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.test import override_settings
from django.utils import timezone

import django_idempotency
from django_idempotency import AlreadyInProgress, KeyReused, core, idempotent_function, signals
from django_idempotency.exceptions import KeyInvalid, ResultUnavailable, StoreUnavailable
from django_idempotency.functions import RESULT_CONTENT_TYPE
from django_idempotency.heartbeat import heartbeat
from django_idempotency.keys import hash_key
from django_idempotency.storage import get_storage
from django_idempotency.storage.base import State
from tests.faults import store_unreachable
from tests.testapp import functions
from tests.testapp.models import Payment

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    functions.DELAY = 0.0
    functions.SCRIPT.clear()
    functions.ran_for.clear()
    functions.HOOKS.clear()
    yield
    functions.DELAY = 0.0
    functions.SCRIPT.clear()
    functions.ran_for.clear()
    functions.HOOKS.clear()


def new_order() -> str:
    return f"order-{uuid.uuid4().hex[:12]}"


def record_of(scope: str, key: str) -> Any:
    return get_storage().get(scope, hash_key(scope, key))


# --- one process ------------------------------------------------------------------------------


def test_first_call_runs_and_later_calls_return_the_stored_value() -> None:
    order = new_order()
    first = functions.charge(order, 250)
    second = functions.charge(order, 250)

    assert first == second == {"payment": Payment.objects.get().pk, "amount": 250, "order": order}
    assert functions.ran_for == [order]
    record = record_of("payments", f"charge:{order}")
    assert record.state is State.COMPLETED
    assert dict(record.response.headers)["Content-Type"] == RESULT_CONTENT_TYPE
    assert json.loads(record.response.body) == first


def test_positional_and_keyword_arguments_are_the_same_call() -> None:
    order = new_order()
    functions.charge(order)
    assert functions.charge(order_id=order, amount=100) == functions.charge(order, 100)
    assert functions.ran_for == [order]


def test_same_key_with_other_arguments_raises_key_reused_and_keeps_the_result() -> None:
    order = new_order()
    first = functions.charge(order, 250)
    with pytest.raises(KeyReused):
        functions.charge(order, 9999)
    assert functions.charge(order, 250) == first
    assert Payment.objects.count() == 1


def test_custom_fingerprint_decides_what_is_the_same_call() -> None:
    order = new_order()
    assert functions.total(order, 1) == {"order": order, "amount": 1}
    assert functions.total(order, 2) == {"order": order, "amount": 1}
    assert functions.ran_for == [order]


def test_exception_releases_the_key_rolls_back_and_propagates() -> None:
    order = new_order()
    functions.SCRIPT.append("raise")
    with pytest.raises(RuntimeError, match="card network down"):
        functions.charge(order)
    assert record_of("payments", f"charge:{order}") is None
    assert Payment.objects.count() == 0  # the body's row rolled back with it

    value = functions.charge(order)
    assert functions.ran_for == [order, order]
    assert list(Payment.objects.values_list("pk", flat=True)) == [value["payment"]]


def test_result_that_is_not_json_is_a_type_error_and_nothing_is_stored() -> None:
    order = new_order()
    functions.SCRIPT.append("object")
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        functions.charge(order)
    assert record_of("payments", f"charge:{order}") is None
    assert Payment.objects.count() == 0
    assert functions.charge(order)["order"] == order
    assert Payment.objects.count() == 1


def test_key_none_runs_unprotected() -> None:
    functions.charge("unkeyed")
    functions.charge("unkeyed")
    assert functions.ran_for == ["unkeyed", "unkeyed"]
    assert Payment.objects.count() == 2


@pytest.mark.parametrize("bad", ["with space", "", "x" * 256, "a,b"])
def test_malformed_key_is_refused_before_anything_runs(bad: str) -> None:
    @idempotent_function(key=lambda: bad)
    def work() -> int:
        functions.ran_for.append("ran")
        return 1

    with pytest.raises(KeyInvalid):
        work()
    assert functions.ran_for == []


def test_key_of_another_type_is_a_type_error() -> None:
    @idempotent_function(key=lambda n: n)
    def work(n: int) -> int:
        return n

    with pytest.raises(TypeError, match="returned int, not str"):
        work(3)


def test_arguments_that_are_not_json_need_a_fingerprint() -> None:
    @idempotent_function(key=lambda thing: "fixed")
    def work(thing: object) -> int:
        return 1

    with pytest.raises(TypeError, match="pass fingerprint="):
        work(object())


def test_default_scope_is_the_functions_dotted_name() -> None:
    @idempotent_function(key=lambda: "k")
    def work() -> int:
        return 7

    assert work() == 7
    scope = f"function:{__name__}.test_default_scope_is_the_functions_dotted_name.<locals>.work"
    assert record_of(scope, "k").state is State.COMPLETED


def test_call_in_progress_raises_with_retry_after_and_wait_returns_the_value() -> None:
    order = new_order()
    functions.DELAY = 1.0
    results: dict[str, Any] = {}

    def owner() -> None:
        try:
            results["owner"] = functions.charge(order)
        finally:
            connections.close_all()

    thread = threading.Thread(target=owner)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while record_of("payments", f"charge:{order}") is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(AlreadyInProgress) as excinfo:
        functions.charge(order)
    assert excinfo.value.retry_after is not None and excinfo.value.retry_after >= 1
    assert functions.charge_waiting(order) == {
        "payment": Payment.objects.get().pk,
        "amount": 100,
        "order": order,
    }
    thread.join(TIMEOUT)
    assert results["owner"]["order"] == order
    assert functions.ran_for == [order]


def test_lease_is_renewed_by_the_heartbeat_while_the_body_runs() -> None:
    seen: list[int] = []

    @idempotent_function(key=lambda: "beat")
    def work() -> int:
        seen.append(heartbeat.tracked())
        return 1

    before = heartbeat.tracked()
    work()
    assert seen == [before + 1]
    assert heartbeat.tracked() == before


def test_signals_fire_with_the_store_as_sender_and_no_request() -> None:
    events: list[tuple[str, Any, Any]] = []

    def listen(name: str) -> Any:
        def receiver(sender: type, **kwargs: Any) -> None:
            events.append((name, sender, kwargs["request"]))

        return receiver

    receivers = {
        "claimed": (signals.key_claimed, listen("claimed")),
        "replayed": (signals.response_replayed, listen("replayed")),
        "mismatch": (signals.fingerprint_mismatch, listen("mismatch")),
        "released": (signals.claim_released, listen("released")),
    }
    for signal, receiver in receivers.values():
        signal.connect(receiver)
    try:
        order = new_order()
        functions.SCRIPT.append("raise")
        with pytest.raises(RuntimeError):
            functions.charge(order)
        functions.charge(order)
        functions.charge(order)
        with pytest.raises(KeyReused):
            functions.charge(order, 5)
    finally:
        for signal, receiver in receivers.values():
            signal.disconnect(receiver)
    store = type(get_storage())
    assert events == [
        ("claimed", store, None),
        ("released", store, None),
        ("claimed", store, None),
        ("replayed", store, None),
        ("mismatch", store, None),
    ]


def test_package_root_exports_the_new_names_lazily() -> None:
    assert django_idempotency.AlreadyInProgress is AlreadyInProgress
    assert django_idempotency.KeyReused is KeyReused
    code = (
        "import sys, django_idempotency; "
        "assert 'django_idempotency.functions' not in sys.modules; "
        "assert 'django_idempotency.exceptions' not in sys.modules; "
        "print('light')"
    )
    out = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "light"


# --- async ------------------------------------------------------------------------------------


async def _gather(function: Any, order: str, count: int) -> list[Any]:
    try:
        return await asyncio.gather(
            *(function(order) for _ in range(count)), return_exceptions=True
        )
    finally:
        await sync_to_async(connections.close_all)()


def test_async_calls_under_gather_run_the_body_once() -> None:
    order = new_order()
    functions.DELAY = 0.5
    outcomes = asyncio.run(_gather(functions.acharge, order, 8))

    values = [o for o in outcomes if not isinstance(o, BaseException)]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(values) >= 1
    assert all(isinstance(e, AlreadyInProgress) for e in errors), errors
    assert all(v == values[0] for v in values)
    assert functions.ran_for == [order]
    assert list(Payment.objects.values_list("pk", flat=True)) == [values[0]["payment"]]
    functions.DELAY = 0.0
    assert asyncio.run(_gather(functions.acharge, order, 1)) == [values[0]]
    assert functions.ran_for == [order]


def test_async_calls_that_wait_all_get_the_value() -> None:
    order = new_order()
    functions.DELAY = 0.5
    outcomes = asyncio.run(_gather(functions.acharge_waiting, order, 8))
    assert all(o == outcomes[0] for o in outcomes), outcomes
    assert functions.ran_for == [order]
    assert Payment.objects.count() == 1


def test_async_exception_lets_the_next_call_run() -> None:
    order = new_order()
    functions.SCRIPT.append("raise")
    outcomes = asyncio.run(_gather(functions.acharge, order, 1))
    assert isinstance(outcomes[0], RuntimeError)
    again = asyncio.run(_gather(functions.acharge, order, 1))
    assert again[0]["order"] == order
    assert functions.ran_for == [order, order]


# --- across OS processes ----------------------------------------------------------------------


def run_in_processes(
    function: str, order: str, count: int, tmp_path: Path, *, delay: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Start ``count`` workers, release them together; their outcomes and the executions log."""
    executions = tmp_path / "executions.log"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "IDEMPOTENCY_SERVE_DB_NAME": str(connection.settings_dict["NAME"]),
        "IDEMPOTENCY_SERVE_DELAY": str(delay),
        "IDEMPOTENCY_TEST_EXECUTIONS_FILE": str(executions),
    }
    processes: list[subprocess.Popen[str]] = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(  # noqa: S603 - our own module, no shell
                    [sys.executable, "-m", "tests.function_worker", function, order],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + TIMEOUT
        for process in processes:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
            assert ready and process.stdout.readline().strip() == "READY"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outcomes = []
        for process in processes:
            out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outcomes.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    lines = executions.read_text().splitlines() if executions.exists() else []
    return outcomes, lines


@pytest.mark.parametrize(
    ("function", "delay"),
    [("charge", 0.5), ("charge", 0.0), ("charge_waiting", 0.5), ("acharge", 0.5)],
    ids=["overlapping", "fast-body", "waiting", "async"],
)
def test_eight_processes_with_one_key_run_the_body_once(
    function: str, delay: float, tmp_path: Path
) -> None:
    order = new_order()
    outcomes, executions = run_in_processes(function, order, 8, tmp_path, delay=delay)

    assert not [o for o in outcomes if o["outcome"] == "error"], outcomes
    assert len(executions) == 1, executions
    payment = Payment.objects.get()
    expected = {"payment": payment.pk, "amount": 100, "order": order}
    allowed = {"value", "in_progress"}
    if connection.vendor == "sqlite" and get_storage().transactional:
        allowed.add("store_unavailable")  # SQLite's single writer (the contract's section 8)
    for outcome in outcomes:
        assert outcome["outcome"] in allowed, outcomes
        if outcome["outcome"] == "value":
            assert outcome["value"] == expected
        else:
            assert outcome["retry_after"] >= 1
    if function == "charge_waiting":
        assert not [o for o in outcomes if o["outcome"] == "in_progress"], outcomes
    assert any(o["outcome"] == "value" for o in outcomes), outcomes

    # Later, in this process: the stored value, and the body does not run again.
    if function == "acharge":
        later = asyncio.run(_gather(functions.acharge, order, 1))[0]
    else:
        later = functions.charge(order)
    assert later == expected
    assert functions.ran_for == []
    assert Payment.objects.count() == 1


@override_settings(IDEMPOTENCY_LEASE=1)
def test_exception_in_one_process_lets_the_next_process_run(tmp_path: Path) -> None:
    order = new_order()
    functions.SCRIPT.append("raise")
    with pytest.raises(RuntimeError):
        functions.charge(order)
    outcomes, executions = run_in_processes("charge", order, 1, tmp_path, delay=0)
    assert outcomes[0]["outcome"] == "value", outcomes
    assert len(executions) == 1
    assert Payment.objects.get().pk == outcomes[0]["value"]["payment"]


# --- failures of the store and of the lease ---------------------------------------------------


@pytest.fixture
def store_down() -> Iterator[None]:
    with store_unreachable():
        yield


@pytest.mark.usefixtures("store_down")
def test_store_down_raises_store_unavailable_and_the_body_does_not_run() -> None:
    with pytest.raises(StoreUnavailable) as excinfo:
        functions.total(new_order())
    assert excinfo.value.retry_after == 1
    assert functions.ran_for == []


@pytest.mark.usefixtures("store_down")
@override_settings(IDEMPOTENCY_FAIL_OPEN=True)
def test_store_down_with_fail_open_runs_the_body_unprotected() -> None:
    order = new_order()
    assert functions.total(order, 3) == {"order": order, "amount": 3}
    assert functions.ran_for == [order]


@override_settings(IDEMPOTENCY_MAX_RESPONSE_SIZE=10)
def test_result_too_large_to_store_is_returned_once_then_unavailable() -> None:
    order = new_order()
    assert functions.total(order, 3) == {"order": order, "amount": 3}
    with pytest.raises(ResultUnavailable):
        functions.total(order, 3)
    assert functions.ran_for == [order]


def test_lease_lost_while_the_body_ran_raises_already_in_progress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body that outlived its lease without a heartbeat (a frozen process) and was taken over:
    its result is not stored over the new owner's claim, and its writes are rolled back."""
    monkeypatch.setattr(heartbeat, "track", lambda flight: None)
    shift = [timedelta()]
    monkeypatch.setattr(core, "now", lambda: timezone.now() + shift[-1])
    once = functions.charge.idempotency  # type: ignore[attr-defined]
    order = new_order()
    scope, key_hash, fingerprint = once.identify((order,), {})
    took_over: list[bool] = []

    def take_over() -> None:
        try:
            claim = get_storage().claim(
                scope,
                key_hash,
                fingerprint,
                now=core.now(),
                lease=timedelta(seconds=60),
                ttl=timedelta(hours=1),
            )
            took_over.append(claim.reclaimed)
        finally:
            connections.close_all()

    def frozen_then_taken_over() -> None:
        shift.append(timedelta(minutes=5))  # the lease (60 s) ended while this body ran
        thread = threading.Thread(target=take_over)
        thread.start()
        thread.join(TIMEOUT)

    functions.HOOKS.append(frozen_then_taken_over)
    with pytest.raises(AlreadyInProgress):
        functions.charge(order)
    assert took_over == [True]
    assert Payment.objects.count() == 0
    assert record_of("payments", f"charge:{order}").state is State.IN_FLIGHT  # the new owner's


def test_result_expires_after_its_ttl_on_the_engines_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim reads ``core.now`` on every call, the one clock the engine and its tests move."""
    shift = [timedelta()]
    monkeypatch.setattr(core, "now", lambda: timezone.now() + shift[-1])
    order = new_order()
    first = functions.charge(order)
    shift.append(timedelta(days=2))  # past IDEMPOTENCY_TTL (24 h)
    second = functions.charge(order)
    assert second["payment"] != first["payment"]
    assert functions.ran_for == [order, order]
