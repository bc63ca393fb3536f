"""What a purge reports: the result types shared by the stores and the purge command."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: Rows per purge batch unless the caller says otherwise. Measured on PostgreSQL with
#: ``bench/purge_bench.py`` (see ``docs/purge.md``): large enough that a million rows go in
#: seconds, small enough that no batch holds its row locks for anything near a second.
PURGE_BATCH_SIZE = 1000

#: Why a purge stopped before it ran out of records: the caller's batch or time budget.
PurgeStop = Literal["max_batches", "time_limit"]


@dataclass(frozen=True)
class PurgeBatch:
    """One batch as it finishes, handed to ``purge_expired(progress=...)``."""

    number: int
    #: ``"expired"`` or ``"stale_in_flight"``: which condition selected the batch.
    kind: str
    #: Records deleted, or that a dry run would delete.
    count: int
    seconds: float


@dataclass(frozen=True)
class PurgeResult:
    #: Records deleted, or that a dry run would delete; includes ``stale_in_flight``.
    deleted: int = 0
    batches: int = 0
    #: Per-batch durations in seconds, for ``--verbosity 2`` and the benchmark.
    batch_seconds: list[float] = field(default_factory=list)
    #: The part of ``deleted`` that was in flight with a long-dead lease.
    stale_in_flight: int = 0
    dry_run: bool = False
    #: Set when a budget ended the purge early; more expired records may remain.
    stopped_by: PurgeStop | None = None
    #: Wall-clock seconds of the whole purge.
    seconds: float = 0.0
