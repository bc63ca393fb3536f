"""Prometheus metrics from the package's signals (``pip install django-idempotency[prometheus]``).

Enable it by adding ``"django_idempotency.contrib.prometheus"`` to ``INSTALLED_APPS``; the
metrics are registered in ``prometheus_client``'s default registry, so an existing ``/metrics``
endpoint (django-prometheus, or :func:`metrics_view`) exports them:

``django_idempotency_requests_total{outcome, view}``
    One per protected request that reached the layer, by what happened to it: ``claimed``,
    ``replayed``, ``conflict`` (409 in progress), ``mismatch`` (422 reused key), ``released``
    (the view failed and the key was freed), ``reclaimed`` (a crashed worker's lease was taken
    over; also counted as ``claimed``), ``store_error`` and ``missing_key``.
``django_idempotency_store_seconds{operation}``
    Latency of the store calls the engine makes: ``claim``, ``complete``, ``release``,
    ``renew``, whether they succeeded or raised.

``view`` is the URL pattern's name (``namespace:name``) or, for an unnamed pattern, its route:
a bounded set. The key, its hash and the scope never appear in a label, since each would make a
new time series per request or per user.

Under a multi-process server set ``PROMETHEUS_MULTIPROC_DIR`` before the workers start, as
``prometheus_client`` documents; :func:`metrics_view` then aggregates every worker's files.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.dispatch import Signal
from django.http import HttpRequest, HttpResponse

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImproperlyConfigured(
        "django_idempotency.contrib.prometheus needs prometheus_client: "
        "pip install 'django-idempotency[prometheus]'"
    ) from exc

from django_idempotency import core, signals

REQUESTS = Counter(
    "django_idempotency_requests",
    "Protected requests by what the idempotency layer did with them.",
    ["outcome", "view"],
)
STORE_SECONDS = Histogram(
    "django_idempotency_store_seconds",
    "Latency of idempotency store calls.",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

#: Each signal and the outcome it counts.
OUTCOMES: dict[str, Signal] = {
    "claimed": signals.key_claimed,
    "replayed": signals.response_replayed,
    "conflict": signals.request_conflict,
    "mismatch": signals.fingerprint_mismatch,
    "released": signals.claim_released,
    "reclaimed": signals.lease_reclaimed,
    "store_error": signals.store_error,
    "missing_key": signals.key_missing,
}

_UID = "django_idempotency.contrib.prometheus"


def view_label(request: Any) -> str:
    """The URL pattern that routed ``request``: its name, or its route when it has none."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unresolved"
    if match.url_name:
        return str(match.view_name)
    return str(match.route or match.view_name)


def _counter(outcome: str) -> Any:
    def receiver(sender: Any, request: Any = None, **kwargs: Any) -> None:
        REQUESTS.labels(outcome=outcome, view=view_label(request)).inc()

    return receiver


# Signals hold receivers weakly by default; these live as long as the module.
_RECEIVERS = {outcome: _counter(outcome) for outcome in OUTCOMES}


def _observe(operation: str, seconds: float) -> None:
    STORE_SECONDS.labels(operation=operation).observe(seconds)


def install() -> None:
    """Connect the counters to the signals and time the store calls (idempotent)."""
    for outcome, signal in OUTCOMES.items():
        signal.connect(_RECEIVERS[outcome], dispatch_uid=f"{_UID}.{outcome}")
    core.store_timer = _observe


def uninstall() -> None:
    """Undo :func:`install`: signals go back to costing nothing when nobody listens."""
    for outcome, signal in OUTCOMES.items():
        signal.disconnect(dispatch_uid=f"{_UID}.{outcome}")
    if core.store_timer is _observe:
        core.store_timer = None


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The Prometheus exposition of this process, or of every worker in multiprocess mode.

    Route it yourself (``path("metrics/", metrics_view)``) behind whatever protects your
    internal endpoints; a project that already exports metrics needs nothing more.
    """
    import os

    registry: CollectorRegistry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
