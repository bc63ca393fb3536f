"""Idempotency-Key support for Django and Django REST framework.

The package root stays light: importing it loads neither the models nor DRF, so that
``settings.py`` and ``apps.py`` of a project can import it safely. The public names are
resolved on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

__all__ = [
    "AlreadyInProgress",
    "IdempotencyMixin",
    "KeyReused",
    "__version__",
    "idempotent",
    "idempotent_function",
]

if TYPE_CHECKING:
    from django_idempotency.decorators import idempotent
    from django_idempotency.exceptions import AlreadyInProgress, KeyReused
    from django_idempotency.functions import idempotent_function
    from django_idempotency.mixins import IdempotencyMixin

_LAZY = {
    "idempotent": "django_idempotency.decorators",
    "IdempotencyMixin": "django_idempotency.mixins",
    "idempotent_function": "django_idempotency.functions",
    "AlreadyInProgress": "django_idempotency.exceptions",
    "KeyReused": "django_idempotency.exceptions",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'django_idempotency' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
