"""The order confirmation: a side effect outside the database, so it must never run twice."""

from __future__ import annotations

import logging

from django.core.mail import send_mail

from example_project.shop.models import Order

logger = logging.getLogger("example_project.shop")


def send_order_confirmation(order_id: int) -> None:
    order = Order.objects.select_related("product", "user").get(pk=order_id)
    send_mail(
        subject=f"Order #{order.pk} confirmed",
        message=f"You ordered {order.quantity} x {order.product.name}.",
        from_email=None,
        recipient_list=[order.user.email or f"{order.user.get_username()}@example.com"],
    )
    logger.info("Sent the confirmation email for order #%s", order.pk)
