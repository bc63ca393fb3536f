"""The Prometheus exporter, scraped after real requests on the configured store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client, RequestFactory, override_settings
from django.utils import timezone

from django_idempotency import core
from django_idempotency.keys import hash_key
from django_idempotency.storage import get_storage
from tests.behaviour import fingerprint_for, scope_of, send
from tests.factories import UserFactory
from tests.faults import store_unreachable
from tests.testapp import views

prometheus = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from django_idempotency.contrib import prometheus as exporter  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape() -> Samples:
    """Read the exposition text the way Prometheus does, through the exporter's view."""
    response = exporter.metrics_view(RequestFactory().get("/metrics"))
    assert response["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        if family.name.startswith("django_idempotency_"):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def delta(before: Samples, after: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    changed = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: v for k, v in changed.items() if v}


def requests_total(changes: dict[Any, float]) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["outcome"], dict(labels)["view"]): value
        for (name, labels), value in changes.items()
        if name == "django_idempotency_requests_total"
    }


def store_calls(changes: dict[Any, float]) -> dict[str, float]:
    return {
        dict(labels)["operation"]: value
        for (name, labels), value in changes.items()
        if name == "django_idempotency_store_seconds_count"
    }


@pytest.fixture
def metrics() -> Iterator[None]:
    """The exporter enabled the documented way: its app in INSTALLED_APPS."""
    apps = [*settings.INSTALLED_APPS, "django_idempotency.contrib.prometheus"]
    with override_settings(INSTALLED_APPS=apps):
        assert core.store_timer is not None
        yield
    exporter.uninstall()
    assert core.store_timer is None


@pytest.fixture
def store_down() -> Iterator[None]:
    with store_unreachable():
        yield


def hold(user: Any, key: str, url: str, *, age: int) -> None:
    """Claim ``key`` as another worker would, ``age`` seconds ago with a 60 s lease."""
    scope = scope_of(user)
    get_storage().claim(
        scope,
        hash_key(scope, key),
        fingerprint_for(url),
        now=timezone.now() - timedelta(seconds=age),
        lease=timedelta(seconds=60),
        ttl=timedelta(hours=1),
    )


@pytest.mark.usefixtures("metrics")
def test_every_outcome_is_counted_by_view() -> None:
    user = UserFactory.create()
    client = Client()
    client.force_login(user)
    url = "/mixin/payments/"
    before = scrape()

    assert send(client, url, key="a").status_code == 201  # claimed
    assert send(client, url, key="a")["Idempotent-Replayed"] == "true"  # replayed
    assert send(client, url, {"amount": 2}, key="a").status_code == 422  # mismatch
    assert send(client, "/mixin/required/").status_code == 400  # missing_key
    views.SCRIPT.append("500")
    assert send(client, url, key="b").status_code == 500  # claimed, released
    hold(user, "c", url, age=0)
    assert send(client, url, key="c").status_code == 409  # conflict
    hold(user, "d", url, age=120)
    assert send(client, url, key="d").status_code == 201  # reclaimed, claimed
    assert send(client, "/mw/viewset/payments/refund/", key="e").status_code == 201

    changes = delta(before, scrape())
    assert requests_total(changes) == {
        ("claimed", "mixin/payments/"): 3,
        ("replayed", "mixin/payments/"): 1,
        ("mismatch", "mixin/payments/"): 1,
        ("released", "mixin/payments/"): 1,
        ("conflict", "mixin/payments/"): 1,
        ("reclaimed", "mixin/payments/"): 1,
        ("missing_key", "mixin/required/"): 1,
        # A named route is labelled by its name; the middleware's views count alike.
        ("claimed", "mw-payment-refund"): 1,
    }
    # Seven claims on /mixin/payments/ and one on the action; every stored result and release.
    assert store_calls(changes) == {"claim": 7, "complete": 3, "release": 1}


@pytest.mark.usefixtures("metrics")
def test_store_errors_are_counted(store_down: None) -> None:
    client = Client()
    client.force_login(UserFactory.create())
    before = scrape()
    assert send(client, "/mixin/payments/", key="k").status_code == 503
    changes = delta(before, scrape())
    assert requests_total(changes) == {("store_error", "mixin/payments/"): 1}
    assert store_calls(changes) == {"claim": 1}


@pytest.mark.usefixtures("metrics")
def test_labels_never_carry_the_key_or_the_scope() -> None:
    user = UserFactory.create()
    client = Client()
    client.force_login(user)
    send(client, "/mixin/payments/", key="secret-key-123")
    send(client, "/mixin/payments/", key="secret-key-123")
    key_hash = hash_key(scope_of(user), "secret-key-123")
    for _name, labels in scrape():
        for label, value in labels:
            assert label in {"outcome", "view", "operation", "le"}
            assert "secret-key-123" not in value
            assert key_hash not in value
            assert scope_of(user) not in value


def test_without_the_app_nothing_is_timed_or_counted() -> None:
    assert core.store_timer is None
    before = scrape()
    client = Client()
    client.force_login(UserFactory.create())
    send(client, "/mixin/payments/", key="k")
    assert delta(before, scrape()) == {}


def test_multiprocess_mode_adds_up_every_worker(tmp_path: Path) -> None:
    """Each worker writes its own files under PROMETHEUS_MULTIPROC_DIR; the view sums them."""
    worker = textwrap.dedent(
        """
        import django
        from django.conf import settings
        settings.configure(INSTALLED_APPS=["django_idempotency",
                                           "django_idempotency.contrib.prometheus"])
        django.setup()
        from django_idempotency import core, signals
        from django_idempotency.storage.base import BaseStorage
        signals.key_claimed.send(sender=BaseStorage, request=None, scope="s", key_hash="h")
        core.store_timer("claim", 0.002)
        """
    )
    scraper = textwrap.dedent(
        """
        import django
        from django.conf import settings
        settings.configure()
        django.setup()
        from django.test import RequestFactory
        from django_idempotency.contrib.prometheus import metrics_view
        print(metrics_view(RequestFactory().get("/metrics")).content.decode())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    for _ in range(3):
        subprocess.run([sys.executable, "-c", worker], env=env, check=True, timeout=60)  # noqa: S603
    text = subprocess.run(  # noqa: S603
        [sys.executable, "-c", scraper],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    ).stdout
    values = {
        (s.name, json.dumps(s.labels, sort_keys=True)): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    claimed = json.dumps({"outcome": "claimed", "view": "unresolved"}, sort_keys=True)
    assert values[("django_idempotency_requests_total", claimed)] == 3
    claim = json.dumps({"operation": "claim"}, sort_keys=True)
    assert values[("django_idempotency_store_seconds_count", claim)] == 3
