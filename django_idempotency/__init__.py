"""Idempotency-Key support for Django and Django REST framework.

The package root stays light: importing it loads neither the models nor DRF, so that
``settings.py`` and ``apps.py`` of a project can import it safely. The public names are
resolved on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

__all__ = ["IdempotencyMixin", "idempotent", "__version__"]

if TYPE_CHECKING:
    from django_idempotency.decorators import idempotent
    from django_idempotency.mixins import IdempotencyMixin

_LAZY = {
    "idempotent": "django_idempotency.decorators",
    "IdempotencyMixin": "django_idempotency.mixins",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'django_idempotency' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
