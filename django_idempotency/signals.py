"""Signals for metrics and audit. Every one is sent with ``sender`` set to the store class and
keyword arguments ``request``, ``scope`` and ``key_hash`` (never the raw key)."""

from __future__ import annotations

from django.dispatch import Signal

key_claimed = Signal()
response_replayed = Signal()
request_conflict = Signal()
fingerprint_mismatch = Signal()
claim_released = Signal()
lease_reclaimed = Signal()
#: A protected view that requires a key got none (400 ``idempotency-key-missing``). Carries
#: ``request`` only: without a key there is no key hash, and the scope is not resolved.
key_missing = Signal()
#: Also carries ``error`` (the exception) and ``stage``: "claim", "renew", "commit", "complete" or
#: "release".
store_error = Signal()
