from __future__ import annotations

from django.apps import AppConfig


class PrometheusConfig(AppConfig):
    """Listed in ``INSTALLED_APPS`` as ``"django_idempotency.contrib.prometheus"``."""

    name = "django_idempotency.contrib.prometheus"
    label = "django_idempotency_prometheus"
    verbose_name = "Idempotency metrics"

    def ready(self) -> None:
        from django_idempotency.contrib.prometheus import install

        install()
