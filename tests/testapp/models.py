from __future__ import annotations

from django.conf import settings
from django.db import models


class Payment(models.Model):
    """The business row whose count proves how often a view really ran."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.CASCADE)
    amount = models.IntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"Payment {self.pk}: {self.amount}"
