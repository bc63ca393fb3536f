"""Once-only functions for the ``idempotent_function`` tests and their worker processes.

Each body writes one ``Payment`` (what committed) and appends a line to ``EXECUTIONS_FILE`` when
one is set (what ran, across processes, committed or not).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from django_idempotency import idempotent_function
from tests.testapp.models import Payment

DELAY = 0.0
#: Steps consumed one per execution: "raise" fails after the row was written, "object" returns
#: a value JSON cannot hold.
SCRIPT: list[str] = []
EXECUTIONS_FILE = os.environ.get("IDEMPOTENCY_TEST_EXECUTIONS_FILE", "")
ran_for: list[str] = []
#: Called in the body before it writes.
HOOKS: list[Callable[[], None]] = []


def _ran(order_id: str) -> None:
    ran_for.append(order_id)
    if EXECUTIONS_FILE:
        # O_APPEND: one whole line per write, whichever process writes it.
        descriptor = os.open(EXECUTIONS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(descriptor, f"{os.getpid()} {order_id}\n".encode())
        finally:
            os.close(descriptor)


def _charge(order_id: str, amount: int) -> Any:
    _ran(order_id)
    if DELAY:
        time.sleep(DELAY)
    for hook in list(HOOKS):
        hook()
    payment = Payment.objects.create(amount=amount)
    step = SCRIPT.pop(0) if SCRIPT else "ok"
    if step == "raise":
        raise RuntimeError("card network down")
    if step == "object":
        return {"payment": payment}
    return {"payment": payment.pk, "amount": amount, "order": order_id}


def charge_key(order_id: str, amount: int = 0, **_: Any) -> str | None:
    return None if order_id == "unkeyed" else f"charge:{order_id}"


@idempotent_function(key=charge_key, scope="payments")
def charge(order_id: str, amount: int = 100) -> Any:
    return _charge(order_id, amount)


@idempotent_function(key=charge_key, scope="payments", wait=30)
def charge_waiting(order_id: str, amount: int = 100) -> Any:
    return _charge(order_id, amount)


@idempotent_function(key=charge_key, scope="payments-async")
async def acharge(order_id: str, amount: int = 100) -> Any:
    _ran(order_id)
    await asyncio.sleep(DELAY)
    payment = await Payment.objects.acreate(amount=amount)
    if SCRIPT and SCRIPT.pop(0) == "raise":
        raise RuntimeError("card network down")
    return {"payment": payment.pk, "amount": amount, "order": order_id}


@idempotent_function(key=charge_key, scope="payments-async", wait=30)
async def acharge_waiting(order_id: str, amount: int = 100) -> Any:
    return await acharge.__wrapped__(order_id, amount)  # type: ignore[attr-defined]


@idempotent_function(
    key=lambda order_id, amount=0: f"total:{order_id}",
    fingerprint=lambda order_id, amount=0: order_id,
)
def total(order_id: str, amount: int = 0) -> Any:
    """Fingerprinted by the order alone: a changed amount replays the first result."""
    _ran(order_id)
    return {"order": order_id, "amount": amount}
