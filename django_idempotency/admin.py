from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import Q, QuerySet
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
    """Read-only: records are written by requests; an operator may only free a stuck key.

    A completed record that has not expired is what makes a retry replay instead of running the
    payment again, so nothing here deletes one: Django's "Delete selected" action is removed and
    a record's delete page is refused. In-flight records may be released (the action, or the
    delete button), and expired ones deleted, since they already count as absent.
    """

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

    def get_actions(self, request: HttpRequest, action_location: Any = None) -> dict[str, Any]:
        # Django 6.1 passes where the actions are shown and deprecates overrides that do not
        # take it; older versions call this with the request alone.
        if action_location is None:
            actions = super().get_actions(request)
        else:
            actions = super().get_actions(request, action_location)  # type: ignore[call-arg]
        actions.pop("delete_selected", None)
        return actions

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if not super().has_delete_permission(request, obj):
            return False
        return obj is None or _deletable(timezone.now()).filter(pk=obj.pk).exists()

    def delete_model(self, request: HttpRequest, obj: IdempotencyKey) -> None:
        # The record may have completed since the confirmation page was shown: delete it only if
        # it is still deletable, in one statement.
        deleted, _unused = _deletable(timezone.now()).filter(pk=obj.pk).delete()
        if not deleted:
            self.message_user(
                request,
                _("The key was not deleted: it completed meanwhile and replays until it expires."),
                messages.WARNING,
            )

    @admin.action(description=_("Release selected in-flight keys"), permissions=["delete"])
    def release_in_flight(self, request: HttpRequest, queryset: QuerySet[IdempotencyKey]) -> None:
        # Only in-flight rows: a completed result must keep replaying until it expires.
        deleted, _unused = queryset.filter(state=IdempotencyKey.States.IN_FLIGHT).delete()
        self.message_user(
            request,
            _("Released %(count)d in-flight key(s).") % {"count": deleted},
            messages.SUCCESS,
        )


def _deletable_condition(now: Any) -> Q:
    return Q(state=IdempotencyKey.States.IN_FLIGHT) | Q(expires_at__lte=now)


def _deletable(now: Any) -> QuerySet[IdempotencyKey]:
    """Records whose deletion cannot make a retry run a completed request again."""
    return IdempotencyKey.objects.filter(_deletable_condition(now))  # type: ignore[no-any-return]
