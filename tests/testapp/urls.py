from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt
from rest_framework.routers import SimpleRouter

from tests.testapp import views, webhooks

router = SimpleRouter()
router.register("viewset/payments", views.PaymentViewSet, basename="payment")
router.register("actions", views.ActionViewSet, basename="action")

urlpatterns = [
    path("admin/", admin.site.urls),
    path("mixin/payments/", views.PaymentAPIView.as_view()),
    path("mixin/required/", views.RequiredPaymentAPIView.as_view()),
    path("decorator/payments/", views.payment_api_view),
    path("decorator/required/", views.required_api_view),
    path("django/payments/", csrf_exempt(views.payment_django_view)),
    # Not csrf_exempt(): before Django 5.0 it wraps a coroutine view in a sync function, which
    # Django then calls without awaiting. No CSRF middleware runs here anyway.
    path("async/payments/", views.payment_async_view),
    path("webhooks/django/", webhooks.django_webhook),
    path("webhooks/api/", webhooks.api_webhook),
    path("webhooks/mixin/", webhooks.WebhookView.as_view()),
    path("", include(router.urls)),
]
