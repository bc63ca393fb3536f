"""Fixtures for the example project's tests, and their guard under the package's settings.

The package suite (``tests.settings``) collects this folder too, but the example's app is not
installed there. Instead of failing to import, each module then reports one skipped test that
names the command which does run them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

EXAMPLE_SETTINGS = "tests.example.settings"
ACTIVE = settings.SETTINGS_MODULE == EXAMPLE_SETTINGS
RUN_COMMAND = f"pytest -p no:randomly --ds={EXAMPLE_SETTINGS} tests/example"


class _ElsewhereModule(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        item = _ElsewhereItem.from_parent(self, name="example_project")
        reason = f"the example project has its own settings: run {RUN_COMMAND}"
        item.add_marker(pytest.mark.skip(reason=reason))
        yield item


class _ElsewhereItem(pytest.Item):
    def runtest(self) -> None:
        raise AssertionError("always skipped")

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, self.name


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> Any:
    if ACTIVE:
        return None
    return _ElsewhereModule.from_parent(parent, path=module_path)


if ACTIVE:
    from rest_framework.test import APIClient

    from example_project.shop.demo_data import (
        DEMO_USERNAME,
        OTHER_USERNAME,
        DemoUser,
        ensure_stock,
        ensure_user,
    )
    from example_project.shop.models import Product

    @pytest.fixture
    def alice(db: None) -> DemoUser:
        return ensure_user(DEMO_USERNAME)

    @pytest.fixture
    def bob(db: None) -> DemoUser:
        return ensure_user(OTHER_USERNAME)

    @pytest.fixture
    def mug(db: None) -> Product:
        return ensure_stock()

    @pytest.fixture
    def alice_api(alice: DemoUser) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {alice.token}")
        return client

    @pytest.fixture
    def bob_api(bob: DemoUser) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {bob.token}")
        return client
