from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt
from rest_framework.routers import SimpleRouter

from tests.testapp import views, webhooks

router = SimpleRouter()
router.register("viewset/payments", views.PaymentViewSet, basename="payment")
router.register("actions", views.ActionViewSet, basename="action")
router.register("mw/viewset/payments", views.MwPaymentViewSet, basename="mw-payment")

urlpatterns = [
    path("admin/", admin.site.urls),
    path("mixin/payments/", views.PaymentAPIView.as_view()),
    path("mixin/required/", views.RequiredPaymentAPIView.as_view()),
    path("unprotected/payments/", views.UnprotectedPaymentAPIView.as_view()),
    path("decorator/payments/", views.payment_api_view),
    path("decorator/required/", views.required_api_view),
    path("django/payments/", csrf_exempt(views.payment_django_view)),
    # Not csrf_exempt(): before Django 5.0 it wraps a coroutine view in a sync function, which
    # Django then calls without awaiting. No CSRF middleware runs here anyway.
    path("async/payments/", views.payment_async_view),
    # Protected by IdempotencyMiddleware alone (IDEMPOTENCY_PATHS = ["/mw/"] in the settings).
    path("mw/django/payments/", csrf_exempt(views.mw_django_view)),
    path("mw/async/payments/", views.mw_async_view),
    path("mw/apiview/payments/", views.MwPaymentAPIView.as_view()),
    path("mw/api-view/payments/", views.mw_api_view),
    path("mw/exempt/django/", csrf_exempt(views.mw_exempt_django_view)),
    path("mw/exempt/cbv/", csrf_exempt(views.MwExemptDjangoView.as_view())),
    path("mw/exempt/apiview/", views.MwExemptAPIView.as_view()),
    path("mw/exempt/api-view/", views.mw_exempt_api_view),
    path("mw/own/mixin/", views.MwOwnOptionsAPIView.as_view()),
    path("mw/own/api-view/", views.mw_own_options_api_view),
    path("mw/own/django/", csrf_exempt(views.mw_own_options_django_view)),
    path("mw/wrapped/", views.mw_wrapped_drf_view),
    path("webhooks/django/", webhooks.django_webhook),
    path("webhooks/api/", webhooks.api_webhook),
    path("webhooks/mixin/", webhooks.WebhookView.as_view()),
    path("", include(router.urls)),
]
