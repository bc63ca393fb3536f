from __future__ import annotations

from datetime import datetime

from django.db import models
from django.utils.translation import gettext_lazy as _

from django_idempotency.storage.base import State


class IdempotencyKeyQuerySet(models.QuerySet):  # type: ignore[type-arg]
    def expired(self, now: datetime) -> IdempotencyKeyQuerySet:
        return self.filter(expires_at__lte=now)  # type: ignore[no-any-return]

    def live(self, now: datetime) -> IdempotencyKeyQuerySet:
        return self.filter(expires_at__gt=now)  # type: ignore[no-any-return]


class IdempotencyKey(models.Model):
    """One claimed key of one scope. The raw key is never stored, only its scoped SHA-256."""

    class States(models.TextChoices):
        IN_FLIGHT = State.IN_FLIGHT.value, _("in flight")
        COMPLETED = State.COMPLETED.value, _("completed")
        UNAVAILABLE = State.UNAVAILABLE.value, _("completed, not replayable")

    scope = models.CharField(_("scope"), max_length=255)
    key_hash = models.CharField(_("key hash"), max_length=64)
    fingerprint = models.CharField(_("request fingerprint"), max_length=64)
    state = models.CharField(_("state"), max_length=16, choices=States.choices)
    owner_token = models.CharField(_("owner token"), max_length=32)
    created_at = models.DateTimeField(_("created at"))
    lease_expires_at = models.DateTimeField(_("lease expires at"))
    expires_at = models.DateTimeField(_("expires at"))
    response_status = models.PositiveSmallIntegerField(_("response status"), null=True, blank=True)
    response_headers = models.JSONField(_("response headers"), default=list, blank=True)
    response_body = models.BinaryField(_("response body"), null=True, blank=True)

    objects = IdempotencyKeyQuerySet.as_manager()

    class Meta:
        verbose_name = _("idempotency key")
        verbose_name_plural = _("idempotency keys")
        constraints = [
            models.UniqueConstraint(
                fields=["scope", "key_hash"], name="django_idempotency_scope_key_uniq"
            ),
        ]
        indexes = [
            models.Index(fields=["expires_at"], name="django_idem_expires_idx"),
            models.Index(fields=["state", "lease_expires_at"], name="django_idem_lease_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.scope} {self.key_hash[:12]}… ({self.state})"
