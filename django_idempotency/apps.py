from __future__ import annotations

from django.apps import AppConfig


class DjangoIdempotencyConfig(AppConfig):
    name = "django_idempotency"
    label = "django_idempotency"
    verbose_name = "Idempotency keys"
    # Pinned so that a project's DEFAULT_AUTO_FIELD never makes our migrations look stale.
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_idempotency import checks, storage

        checks.register()
        storage.connect_signals()
