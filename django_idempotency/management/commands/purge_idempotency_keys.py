"""``manage.py purge_idempotency_keys``: the cron job that keeps the key table from growing.

The command only parses options and prints; the store's ``purge_expired()`` does the work, so a
custom store gets the same command for free. Run it as often as you like: each run picks up where
expired records are, and a budget (``--max-batches``, ``--time-limit``) bounds a run on a table
that fell behind.
"""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import Error, connections
from django.utils import timezone

from django_idempotency.exceptions import StoreError
from django_idempotency.storage import get_storage, storage_class
from django_idempotency.storage.base import PURGE_BATCH_SIZE, BaseStorage, PurgeBatch, PurgeResult
from django_idempotency.storage.db import DatabaseStorage

_UNITS = {"w": 7 * 24 * 3600, "d": 24 * 3600, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:\d+[wdhms])+")
_PART = re.compile(r"(\d+)([wdhms])")

_KINDS = {"expired": "expired", "stale_in_flight": "stale in-flight"}
_STOPS = {"max_batches": "--max-batches", "time_limit": "--time-limit"}


def now() -> datetime:
    """The purge's clock; tests replace it to freeze time."""
    return timezone.now()


def parse_duration(value: str) -> timedelta:
    """``7d``, ``36h``, ``90m``, ``45s``, ``2w`` or a sum such as ``1d12h``."""
    text = value.strip().lower()
    if not _DURATION.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a duration: use a whole number followed by w, d, h, m or s "
            "(7d, 36h, 90m, 45s, or a sum such as 1d12h)"
        )
    return timedelta(seconds=sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(text)))


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return number


def positive_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return number


def _plural(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


class Command(BaseCommand):
    help = (
        "Delete idempotency keys whose retention has ended, in short batches that do not block "
        "requests. Stores whose records expire on their own have nothing to purge."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=PURGE_BATCH_SIZE,
            help=f"Records deleted per statement and transaction (default {PURGE_BATCH_SIZE}).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count what would be deleted and delete nothing.",
        )
        parser.add_argument(
            "--older-than",
            type=parse_duration,
            default=timedelta(0),
            metavar="DURATION",
            help="Keep records until they have been expired this long, e.g. 7d, 36h, 90m, 45s "
            "(default: delete as soon as they expire).",
        )
        parser.add_argument(
            "--stale-in-flight",
            type=parse_duration,
            default=None,
            metavar="DURATION",
            help="Also delete in-flight records whose lease ended this long ago (their worker "
            "died). Off by default: a dead lease is reclaimed by the client's retry anyway.",
        )
        parser.add_argument(
            "--max-batches",
            type=positive_int,
            default=None,
            help="Stop after this many batches; the next run continues.",
        )
        parser.add_argument(
            "--time-limit",
            type=positive_seconds,
            default=None,
            metavar="SECONDS",
            help="Start no new batch after this many seconds; the next run continues.",
        )
        parser.add_argument(
            "--database",
            default=None,
            help="Database alias of the ORM store (default: IDEMPOTENCY_DATABASE).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity: int = options["verbosity"]
        # call_command() hands keyword options over without running them through the parser.
        for name in ("older_than", "stale_in_flight"):
            if isinstance(options[name], str):
                options[name] = self._duration(name, options[name])
        store = self._store(options["database"])
        if store.native_expiry:
            if verbosity >= 1:
                self.stdout.write(
                    f"{type(store).__name__} expires idempotency keys natively; "
                    "there is nothing to purge."
                )
            return

        def progress(batch: PurgeBatch) -> None:
            verb = "would delete" if options["dry_run"] else "deleted"
            self.stdout.write(
                f"Batch {batch.number}: {verb} {batch.count} {_KINDS.get(batch.kind, batch.kind)} "
                f"({batch.seconds:.3f}s)"
            )

        try:
            result = store.purge_expired(
                now=now(),
                batch_size=options["batch_size"],
                dry_run=options["dry_run"],
                stale_in_flight=options["stale_in_flight"],
                max_batches=options["max_batches"],
                time_limit=options["time_limit"],
                older_than=options["older_than"],
                progress=progress if verbosity >= 2 else None,
            )
        except (StoreError, Error) as exc:
            raise CommandError(f"Purging idempotency keys failed: {exc}") from exc
        if verbosity >= 1:
            self.stdout.write(self._summary(result))

    @staticmethod
    def _duration(name: str, value: str) -> timedelta:
        try:
            return parse_duration(value)
        except argparse.ArgumentTypeError as exc:
            raise CommandError(f"--{name.replace('_', '-')}: {exc}") from exc

    def _store(self, database: str | None) -> BaseStorage:
        if database is None:
            return get_storage()
        if database not in connections:
            raise CommandError(f"--database: no database is configured as {database!r}.")
        cls = storage_class()
        if not issubclass(cls, DatabaseStorage):
            raise CommandError(
                f"--database applies to the ORM store; IDEMPOTENCY_STORE is {cls.__name__}."
            )
        return cls(using=database)

    @staticmethod
    def _summary(result: PurgeResult) -> str:
        keys = _plural(result.deleted, "idempotency key", "idempotency keys")
        if result.stale_in_flight:
            keys += f" ({result.stale_in_flight} stale in flight)"
        batches = _plural(result.batches, "batch", "batches")
        if result.dry_run:
            line = f"Dry run: would delete {keys} in {batches} ({result.seconds:.2f}s)."
        else:
            line = f"Deleted {keys} in {batches} ({result.seconds:.2f}s)."
        if result.stopped_by is not None:
            line += f" Stopped by {_STOPS[result.stopped_by]}; more may remain."
        return line
