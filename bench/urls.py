"""The one payment endpoint three ways: bare, the floor, and ours (``IdempotencyMixin``)."""

from __future__ import annotations

from django.urls import path

from bench import views

urlpatterns = [
    path("bench/bare/", views.BarePaymentView.as_view()),
    path("bench/floor/", views.FloorPaymentView.as_view()),
    path("bench/ours/", views.OursPaymentView.as_view()),
    path("bench/async/bare/", views.async_bare_view),
    path("bench/async/ours/", views.async_ours_view),
]
