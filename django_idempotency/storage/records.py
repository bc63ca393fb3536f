"""How a record is written as text: shared by the Redis, Redis-cache and cache-``add()`` stores.

A record is a flat mapping of short text fields (a Redis hash, or a JSON object in a plain cache
value); the stored response is one JSON document whose body is base64, so nothing read back is
ever unpickled. Times travel as integer microseconds since the epoch: exact in a Lua number (a
double) until the year 2255, and an exact round trip for the engine's datetimes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from django_idempotency.conf import settings
from django_idempotency.exceptions import StoreError
from django_idempotency.storage.base import STATES_BY_VALUE, Record, State, StoredResponse

#: Bumped if the stored layout ever changes, so that old records are recognisable.
FORMAT_VERSION = "1"

_EPOCH_AWARE = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_NAIVE = datetime(1970, 1, 1)
MICROSECOND = timedelta(microseconds=1)


def micros(moment: datetime) -> int:
    epoch = _EPOCH_NAIVE if moment.tzinfo is None else _EPOCH_AWARE
    return (moment - epoch) // MICROSECOND


def text(value: object) -> str:
    # decode_responses=True in a client's options hands back str instead of bytes.
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise StoreError(f"unexpected {type(value).__name__} in a stored record")


def flag(value: object) -> bool:
    if not isinstance(value, int):
        raise StoreError(f"script answered {type(value).__name__}, not an integer")
    return bool(value)


#: What a lost claim reads of the record in its way: all that ``to_record`` needs.
HELD_FIELDS = ("state", "fingerprint", "created", "lease_expires", "expires", "response")


def in_flight_fields(
    fingerprint: str, token: str, *, now: datetime, lease: timedelta, ttl: timedelta
) -> dict[str, Any]:
    """The fields of a fresh claim, in the order the claim script writes them."""
    start = micros(now)
    return {
        "v": FORMAT_VERSION,
        "state": State.IN_FLIGHT.value,
        "fingerprint": fingerprint,
        "token": token,
        "created": start,
        "lease_expires": start + lease // MICROSECOND,
        "expires": start + ttl // MICROSECOND,
    }


#: One encoder for every stored response: ``json.dumps`` with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def dump_response(response: StoredResponse) -> str:
    # The headers are pairs in tuples, which JSON writes as arrays.
    return _encode(
        {
            "status": response.status,
            "headers": response.headers,
            "body": base64.b64encode(response.body).decode("ascii"),
        }
    )


def load_response(document: str | bytes) -> StoredResponse:
    # Decoded first: json.loads on bytes detects their encoding in Python, which costs more than
    # decoding the UTF-8 the document always is.
    data = json.loads(text(document))
    return StoredResponse(
        status=int(data["status"]),
        headers=tuple((str(name), str(value)) for name, value in data["headers"]),
        body=base64.b64decode(data["body"], validate=True),
    )


def held_record(values: Sequence[Any]) -> Record:
    """The record from the values of its :data:`HELD_FIELDS`, in that order, ``None`` where
    the record lacks the field: the claim script answers a lost claim this way.

    A replay parses one of these on every request, so the values are read as they come (bytes
    or text) without first building a mapping of them.
    """
    try:
        state_value, fingerprint, created, lease_expires, expires, document = values
        if None in (state_value, fingerprint, created, lease_expires, expires):
            required = zip(HELD_FIELDS[:-1], values[:-1], strict=True)
            missing = [name for name, value in required if value is None]
            raise StoreError(f"unreadable idempotency record: no {', '.join(missing)}")
        state = STATES_BY_VALUE[state_value]
        response = None
        if state is State.COMPLETED and document:
            response = load_response(document)
        # The engine compares record times with its own clock: match its awareness (USE_TZ).
        epoch = _EPOCH_AWARE if settings.USE_TZ else _EPOCH_NAIVE
        return Record(
            fingerprint=text(fingerprint),
            state=state,
            created_at=epoch + int(created) * MICROSECOND,
            lease_expires_at=epoch + int(lease_expires) * MICROSECOND,
            expires_at=epoch + int(expires) * MICROSECOND,
            response=response,
        )
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        # Not ours, or damaged: an outcome we cannot read is an outcome we must not guess. A
        # time beyond what a datetime holds is a number to the claim script, an overflow here.
        raise StoreError(f"unreadable idempotency record: {exc.__class__.__name__}") from exc


def to_record(fields: Mapping[str, Any]) -> Record:
    """The record from all its fields by name (a Redis hash read whole, a cache value)."""
    return held_record([fields.get(name) for name in HELD_FIELDS])
