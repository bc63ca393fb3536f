from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from rest_framework import serializers

from example_project.shop.models import Order, Payment


class PaymentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Payment
        fields = ["id", "amount", "currency", "reference", "created_at"]
        read_only_fields = ["id", "created_at"]

    def validate_amount(self, value: int) -> int:
        if value <= 0:
            raise serializers.ValidationError("must be positive")
        return value


class OrderRequestSerializer(serializers.Serializer):
    sku = serializers.CharField(max_length=32)
    quantity = serializers.IntegerField(min_value=1, max_value=10)


class OrderSerializer(serializers.ModelSerializer):
    sku = serializers.CharField(source="product.sku")
    stock_left = serializers.IntegerField(source="product.stock")

    class Meta:
        model = Order
        fields = ["id", "sku", "quantity", "stock_left", "created_at"]


class RegistrationSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    email = serializers.EmailField()
    password = serializers.CharField(write_only=True, min_length=8)

    def validate_username(self, value: str) -> str:
        if get_user_model().objects.filter(username=value).exists():
            raise serializers.ValidationError("A user with that username already exists.")
        return value

    def validate_password(self, value: str) -> str:
        validate_password(value)
        return value
