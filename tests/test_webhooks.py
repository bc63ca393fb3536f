"""Server-derived keys (issue 10): a signed webhook handled once per provider event.

The provider's redeliveries carry no ``Idempotency-Key``; the view verifies the signature, then
derives the key from the event id (``@idempotent(key=...)``, ``get_idempotency_key``), scoped by
provider. Every storm runs on real threads with their own database connections and counts the
``Payment`` rows the handler writes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from django.test import Client

from django_idempotency import signals
from django_idempotency.keys import hash_key
from django_idempotency.storage import get_storage
from tests.test_concurrency import Outcome, run_together, sqlite_may_refuse, summary
from tests.testapp import webhooks
from tests.testapp.models import Payment

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

ENTRY_POINTS = ["/webhooks/django/", "/webhooks/api/", "/webhooks/mixin/"]


@pytest.fixture(autouse=True)
def _no_delay() -> Iterator[None]:
    webhooks.DELAY = 0.0
    yield
    webhooks.DELAY = 0.0


def event(event_id: str | None, amount: int = 1200) -> bytes:
    payload: dict[str, Any] = {"type": "charge.succeeded", "data": {"amount": amount}}
    if event_id is not None:
        payload["id"] = event_id
    return json.dumps(payload).encode()


def deliver(path: str, body: bytes, *, signature: str | None = None, label: str = "") -> Outcome:
    headers = {webhooks.SIGNATURE_HEADER: webhooks.sign(body) if signature is None else signature}
    response = Client(headers=headers).post(path, data=body, content_type="application/json")
    lowered = {name.lower(): value for name, value in response.headers.items()}
    return Outcome(response.status_code, lowered, response.content, label or path)


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_event_delivered_twenty_times_at_once_and_later_is_handled_once(path: str) -> None:
    webhooks.DELAY = 0.4
    body = event(new_event_id())
    outcomes = run_together([partial(deliver, path, body, label=f"#{i}") for i in range(20)])

    fresh = [o for o in outcomes if o.status == 200 and not o.replayed]
    assert len(fresh) == 1, summary(outcomes)
    for outcome in outcomes:
        if outcome is fresh[0]:
            continue
        if outcome.status == 200:
            assert outcome.replayed and outcome.body == fresh[0].body, summary(outcomes)
        elif outcome.status == 409:
            assert outcome.problem == "idempotency-request-in-progress", outcome.body
            assert int(outcome.headers["retry-after"]) >= 1
        elif outcome.status == 503 and sqlite_may_refuse():
            assert outcome.problem == "idempotency-store-unavailable", outcome.body
        else:
            pytest.fail(f"unexpected {outcome.describe()} in {summary(outcomes)}")
    assert Payment.objects.count() == 1
    assert json.loads(fresh[0].body)["payment"] == Payment.objects.get().pk

    webhooks.DELAY = 0.0
    later = deliver(path, body)
    assert (later.status, later.replayed, later.body) == (200, True, fresh[0].body)
    assert Payment.objects.count() == 1


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_another_event_is_handled(path: str) -> None:
    first = deliver(path, event(new_event_id()))
    second = deliver(path, event(new_event_id()))
    assert (first.status, first.replayed, second.status, second.replayed) == (
        200,
        False,
        200,
        False,
    )
    assert Payment.objects.count() == 2


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_redelivery_with_a_changed_payload_is_422_and_the_original_still_replays(
    path: str,
) -> None:
    event_id = new_event_id()
    original = deliver(path, event(event_id, amount=1200))
    changed = deliver(path, event(event_id, amount=9900))
    again = deliver(path, event(event_id, amount=1200))

    assert original.status == 200 and not original.replayed
    assert changed.status == 422
    assert changed.problem == "idempotency-key-reused"
    assert (again.status, again.replayed, again.body) == (200, True, original.body)
    assert list(Payment.objects.values_list("amount", flat=True)) == [1200]


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_event_without_an_id_is_not_protected(path: str) -> None:
    body = event(None)
    first = deliver(path, body)
    second = deliver(path, body)
    assert (first.status, second.status) == (200, 200)
    assert not first.replayed and not second.replayed
    assert "idempotent-replayed" not in second.headers
    assert Payment.objects.count() == 2


@pytest.mark.parametrize("path", ENTRY_POINTS)
@pytest.mark.parametrize(
    "bad_id",
    ["evt 1", "évt_1", "x" * 256, "evt_1,evt_2", ""],
    ids=["space", "non-ascii", "too-long", "list", "empty"],
)
def test_malformed_derived_key_is_400_and_nothing_runs(path: str, bad_id: str) -> None:
    outcome = deliver(path, event(bad_id))
    assert outcome.status == 400, outcome.describe()
    assert outcome.problem == "idempotency-key-invalid"
    assert bad_id not in outcome.body.decode() or not bad_id
    assert Payment.objects.count() == 0


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_bad_signature_is_refused_before_the_key_is_claimed(path: str) -> None:
    event_id = new_event_id()
    body = event(event_id)
    forged = deliver(path, body, signature=webhooks.sign(b"something else"))
    assert forged.status == 403
    assert get_storage().get("stripe", hash_key("stripe", event_id)) is None
    genuine = deliver(path, body)
    assert genuine.status == 200 and not genuine.replayed
    assert Payment.objects.count() == 1


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_key_is_scoped_by_the_provider_and_signals_fire(path: str) -> None:
    seen: list[tuple[str, str]] = []

    def receiver(sender: type, **kwargs: Any) -> None:
        seen.append((kwargs["scope"], kwargs["key_hash"]))

    event_id = new_event_id()
    signals.key_claimed.connect(receiver)
    try:
        deliver(path, event(event_id))
    finally:
        signals.key_claimed.disconnect(receiver)
    assert seen == [("stripe", hash_key("stripe", event_id))]
    record = get_storage().get("stripe", hash_key("stripe", event_id))
    assert record is not None and record.response is not None


def test_derived_keys_are_taken_literally_and_numeric_ids_work() -> None:
    """A derived key is no header value: ``"abc"`` (quotes included) and ``abc`` are two keys,
    and a numeric event id is its decimal string."""
    from django.test import RequestFactory

    from django_idempotency.core import Policy

    request = RequestFactory().post("/webhooks/")
    assert Policy(key=lambda r: '"abc"').read_key(request) == '"abc"'
    assert Policy(key=lambda r: "abc").read_key(request) == "abc"
    assert Policy(key=lambda r: 42).read_key(request) == "42"  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="returned bytes"):
        Policy(key=lambda r: b"abc").read_key(request)  # type: ignore[arg-type, return-value]
