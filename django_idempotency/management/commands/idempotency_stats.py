"""``manage.py idempotency_stats``: what the store holds, for an operator at a terminal or a script.

The ORM store is read with a handful of aggregate queries: the counts by state, age and expiry
are one pass over the table, the stuck keys use the (state, lease) index, and nothing is loaded
row by row. The time it takes on a million rows is in ``docs/operations.md``. The Redis cache
store has no cheap way to count, so it reads a bounded sample (``--sample``) through ``SCAN`` and
says so. Replays are not recorded per record by either store: the Prometheus exporter counts them.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count, Min, Q
from django.db.models.functions import Length
from django.utils import timezone

from django_idempotency.storage import get_storage
from django_idempotency.storage.base import Record, State
from django_idempotency.storage.db import DatabaseStorage
from django_idempotency.storage.lua import LuaStorage

#: Upper bounds of the age and time-to-expiry buckets, with their labels.
BUCKETS = (
    ("1h", timedelta(hours=1)),
    ("24h", timedelta(hours=24)),
    ("7d", timedelta(days=7)),
)
STATES = tuple(state.value for state in State)
REPLAYS_UNKNOWN = (
    "not recorded by the store; count them with the Prometheus exporter "
    '(django_idempotency_requests_total{outcome="replayed"})'
)


def now() -> datetime:
    """The command's clock; tests replace it to freeze time."""
    return timezone.now()


class Command(BaseCommand):
    help = (
        "Show what the idempotency store holds: records by state, age and expiry, keys stuck "
        "in flight past their lease, and the largest stored responses."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")
        parser.add_argument(
            "--largest", type=int, default=5, help="How many of the largest responses to list."
        )
        parser.add_argument(
            "--sample",
            type=int,
            default=10_000,
            help="Redis store: read at most this many records (SCAN is sampled, not counted).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        storage = get_storage()
        moment = now()
        if isinstance(storage, DatabaseStorage):
            stats = database_stats(storage, moment, largest=options["largest"])
        elif isinstance(storage, LuaStorage):
            stats = redis_stats(
                storage, moment, largest=options["largest"], limit=options["sample"]
            )
        else:
            raise CommandError(
                f"{type(storage).__name__} cannot be inspected: idempotency_stats reads the ORM "
                "store and the cache store on Redis."
            )
        if options["json"]:
            self.stdout.write(json.dumps(stats, indent=2, sort_keys=True))
        else:
            self.stdout.write(render(stats))


def _bucketed(prefix: str, field: str, moment: datetime, *, past: bool) -> dict[str, Any]:
    """Conditional counts for ``field`` within each bucket of ``moment`` (one pass)."""
    counts: dict[str, Any] = {}
    lower = moment
    for label, width in BUCKETS:
        if past:
            window = Q(**{f"{field}__gt": moment - width, f"{field}__lte": lower})
            lower = moment - width
        else:
            window = Q(**{f"{field}__gt": lower, f"{field}__lte": moment + width})
            lower = moment + width
        counts[f"{prefix}_lt_{label}"] = Count("pk", filter=window)
    beyond = Q(**{f"{field}__lte" if past else f"{field}__gt": lower})
    counts[f"{prefix}_ge_{BUCKETS[-1][0]}"] = Count("pk", filter=beyond)
    return counts


def database_stats(storage: DatabaseStorage, moment: datetime, *, largest: int) -> dict[str, Any]:
    from django_idempotency.models import IdempotencyKey

    rows = IdempotencyKey.objects.using(storage.using)
    totals = rows.aggregate(
        total=Count("pk"),
        expired=Count("pk", filter=Q(expires_at__lte=moment)),
        **{f"state_{state}": Count("pk", filter=Q(state=state)) for state in STATES},
        **_bucketed("age", "created_at", moment, past=True),
        **_bucketed("expires", "expires_at", moment, past=False),
    )
    stuck = rows.filter(state=State.IN_FLIGHT.value, lease_expires_at__lte=moment).aggregate(
        count=Count("pk"), oldest=Min("lease_expires_at")
    )
    biggest = (
        rows.exclude(response_body=None)
        .annotate(size=Length("response_body"))
        .order_by("-size", "pk")
        .values_list("key_hash", "response_status", "size", "created_at")[:largest]
    )
    return {
        "store": "db",
        "database": storage.using,
        "sampled": False,
        "at": moment.isoformat(),
        "total": totals["total"],
        "by_state": {state: totals[f"state_{state}"] for state in STATES},
        "by_age": _labelled(totals, "age"),
        "by_expiry": {"expired": totals["expired"], **_labelled(totals, "expires")},
        "in_flight_past_lease": {
            "count": stuck["count"],
            "oldest_lease_end": stuck["oldest"].isoformat() if stuck["oldest"] else None,
        },
        "largest_responses": [
            {
                "key_hash": key_hash[:12],
                "status": status,
                "bytes": size,
                "created_at": created.isoformat(),
            }
            for key_hash, status, size, created in biggest
        ],
        "replays_per_view": REPLAYS_UNKNOWN,
    }


def _labelled(totals: dict[str, Any], prefix: str) -> dict[str, int]:
    labels = [f"lt_{label}" for label, _ in BUCKETS] + [f"ge_{BUCKETS[-1][0]}"]
    return {label: totals[f"{prefix}_{label}"] for label in labels}


def redis_stats(
    storage: LuaStorage, moment: datetime, *, largest: int, limit: int
) -> dict[str, Any]:
    from django_idempotency.storage.records import to_record as _record

    pattern = storage.record_pattern()
    client = storage.client_for(pattern)
    records: list[tuple[str, Record, int]] = []
    keys = []
    for key in client.scan_iter(match=pattern, count=500):
        keys.append(key)
        if len(keys) >= limit:
            break
    unreadable = 0
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.hgetall(key)
        for key, raw in zip(batch, pipe.execute(), strict=True):
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if not fields:
                continue  # expired between SCAN and HGETALL
            try:
                record = _record(fields)
            except Exception:
                unreadable += 1
                continue
            size = len(record.response.body) if record.response else 0
            records.append((_text(key), record, size))
    by_state = dict.fromkeys(STATES, 0)
    by_age = dict.fromkeys([f"lt_{label}" for label, _ in BUCKETS] + ["ge_7d"], 0)
    by_expiry = {"expired": 0, **dict.fromkeys(by_age, 0)}
    stuck: list[datetime] = []
    for _key, record, _size in records:
        by_state[record.state.value] += 1
        by_age[_bucket(moment - record.created_at)] += 1
        if record.expires_at <= moment:
            by_expiry["expired"] += 1
        else:
            by_expiry[_bucket(record.expires_at - moment)] += 1
        if record.state is State.IN_FLIGHT and record.lease_expires_at <= moment:
            stuck.append(record.lease_expires_at)
    biggest = sorted(records, key=lambda item: (-item[2], item[0]))[:largest]
    return {
        **_redis_store_label(storage),
        "sampled": True,
        "sample_limit": limit,
        "at": moment.isoformat(),
        "total": len(records),
        "unreadable": unreadable,
        "by_state": by_state,
        "by_age": by_age,
        "by_expiry": by_expiry,
        "in_flight_past_lease": {
            "count": len(stuck),
            "oldest_lease_end": min(stuck).isoformat() if stuck else None,
        },
        "largest_responses": [
            {
                "key_hash": key.rsplit(":", 1)[-1][:12],
                "status": record.response.status if record.response else None,
                "bytes": size,
                "created_at": record.created_at.isoformat(),
            }
            for key, record, size in biggest
            if size
        ],
        "replays_per_view": REPLAYS_UNKNOWN,
    }


def _bucket(span: timedelta) -> str:
    for label, width in BUCKETS:
        if span < width:
            return f"lt_{label}"
    return f"ge_{BUCKETS[-1][0]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def render(stats: dict[str, Any]) -> str:
    lines = [f"Idempotency records at {stats['at']} ({_where(stats)})", f"Total: {stats['total']}"]
    if stats.get("unreadable"):
        lines.append(f"Unreadable records: {stats['unreadable']}")
    lines.append("By state:")
    lines += [f"  {state:<12}{count:>10}" for state, count in stats["by_state"].items()]
    lines.append("By age (since created):")
    lines += [f"  {_human(label):<12}{count:>10}" for label, count in stats["by_age"].items()]
    lines.append("By expiry (time left):")
    lines += [f"  {_human(label):<12}{count:>10}" for label, count in stats["by_expiry"].items()]
    stuck = stats["in_flight_past_lease"]
    oldest = f" (oldest lease ended {stuck['oldest_lease_end']})" if stuck["count"] else ""
    lines.append(f"In flight past their lease: {stuck['count']}{oldest}")
    lines.append("Largest stored responses:")
    if not stats["largest_responses"]:
        lines.append("  (none)")
    for item in stats["largest_responses"]:
        lines.append(
            f"  {item['bytes']:>10} bytes  status {item['status']}  key {item['key_hash']}  "
            f"created {item['created_at']}"
        )
    lines.append(f"Replays per view: {stats['replays_per_view']}")
    return "\n".join(lines)


def _human(label: str) -> str:
    if label == "expired":
        return "expired"
    bound, _, width = label.partition("_")
    return f"{'<' if bound == 'lt' else '>='} {width}"


def _redis_store_label(storage: LuaStorage) -> dict[str, str]:
    from django_idempotency.storage.cache import CacheStorage

    if isinstance(storage, CacheStorage):
        return {"store": "cache", "cache": storage.alias}
    return {"store": "redis", "prefix": storage.record_pattern().rstrip("*")}


def _where(stats: dict[str, Any]) -> str:
    if stats["store"] == "db":
        return f'ORM store, database "{stats["database"]}"'
    sample = (
        f"a SCAN sample of at most {stats['sample_limit']} records: counts are of the sample, "
        "not of the whole store"
    )
    if stats["store"] == "cache":
        return f'cache store "{stats["cache"]}", {sample}'
    return f'Redis store, prefix "{stats["prefix"]}", {sample}'
