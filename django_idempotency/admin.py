from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from django_idempotency.models import IdempotencyKey


class ExpiryFilter(admin.SimpleListFilter):
    title = _("expiry")
    parameter_name = "expired"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("expired")), ("no", _("live"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.filter(expires_at__lte=timezone.now())  # type: ignore[no-any-return]
        if self.value() == "no":
            return queryset.filter(expires_at__gt=timezone.now())  # type: ignore[no-any-return]
        return queryset


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Read-only: records are written by requests; an operator may only free a stuck key."""

    list_display = ("scope", "short_key", "state", "response_status", "created_at", "expires_at")
    list_filter = ("state", ExpiryFilter)
    search_fields = ("scope",)
    date_hierarchy = "created_at"
    exclude = ("response_body", "owner_token")
    actions = ("release_in_flight",)

    @admin.display(description=_("key hash"))
    def short_key(self, obj: IdempotencyKey) -> str:
        return obj.key_hash[:12] + "…"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description=_("Release selected in-flight keys"), permissions=["delete"])
    def release_in_flight(self, request: HttpRequest, queryset: QuerySet[IdempotencyKey]) -> None:
        # Only in-flight rows: a completed result must keep replaying until it expires.
        deleted, _unused = queryset.filter(state=IdempotencyKey.States.IN_FLIGHT).delete()
        self.message_user(
            request,
            _("Released %(count)d in-flight key(s).") % {"count": deleted},
            messages.SUCCESS,
        )
