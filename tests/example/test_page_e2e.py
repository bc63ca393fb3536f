"""The page at / plays the payment story in a real browser (headless Chromium).

It uses Debian's ``chromium`` and ``chromium-driver`` packages through Selenium, never a browser
download. Without them the test is skipped with the reason, unless
``IDEMPOTENCY_TEST_REQUIRE_SERVICES=1`` (CI), where a missing browser is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from example_project.shop.demo_data import DEMO_USERNAME, ensure_user
from example_project.shop.models import Payment

CHROMIUM = os.environ.get("IDEMPOTENCY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("IDEMPOTENCY_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
WAIT_SECONDS = 30


def _missing() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "Selenium is not installed (pip install -e '.[e2e]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if shutil.which(path) is None:
            return f"{path} is missing (apt-get install -y {package})"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = _missing()
    if missing:
        if os.environ.get("IDEMPOTENCY_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{missing} and IDEMPOTENCY_TEST_REQUIRE_SERVICES=1")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    # Both paths are given, so Selenium never asks Selenium Manager to download anything.
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def _story(driver: Any, panel: str) -> tuple[list[Any], str]:
    """Click the panel's button and return its attempts and the payments count it showed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, f"{panel}-run").click()
    count = WebDriverWait(driver, WAIT_SECONDS).until(
        lambda d: d.find_element(By.ID, f"{panel}-count").get_attribute("data-count")
    )
    attempts = driver.find_elements(By.CSS_SELECTOR, f"#{panel}-attempts li")
    return attempts, count


def test_the_page_shows_one_payment_with_a_key_and_duplicates_without(
    browser: Any, live_server: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    alice = ensure_user(DEMO_USERNAME)
    browser.get(live_server.url + "/")
    # The sign-in form comes filled in with the demo user's credentials.
    browser.find_element(By.ID, "login-submit").click()
    WebDriverWait(browser, WAIT_SECONDS).until(lambda d: d.find_elements(By.ID, "with-key-run"))
    assert browser.find_element(By.ID, "signed-in-as").text == DEMO_USERNAME

    attempts, count = _story(browser, "with-key")
    assert UUID4.match(browser.find_element(By.ID, "with-key-key").text)
    assert [a.get_attribute("data-status") for a in attempts] == ["201", "201", "201"]
    assert [a.get_attribute("data-replayed") for a in attempts] == ["false", "true", "true"]
    assert len({a.get_attribute("data-payment-id") for a in attempts}) == 1
    assert "Idempotent-Replayed: true" in attempts[1].text
    assert count == "1"

    first_key = browser.find_element(By.ID, "with-key-key").text
    attempts, count = _story(browser, "without-key")
    assert [a.get_attribute("data-status") for a in attempts] == ["201", "201", "201"]
    assert [a.get_attribute("data-replayed") for a in attempts] == ["false", "false", "false"]
    assert len({a.get_attribute("data-payment-id") for a in attempts}) == 3
    assert count == "3"

    # A second checkout with a key gets a fresh key of its own.
    _, count = _story(browser, "with-key")
    assert count == "1"
    assert browser.find_element(By.ID, "with-key-key").text != first_key

    assert Payment.objects.filter(user=alice.user).count() == 5
