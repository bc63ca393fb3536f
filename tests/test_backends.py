"""The test matrix finds its servers over TCP or a Unix socket, wherever a host is accepted.

A socket path given as ``PGHOST``, ``MYSQL_HOST`` or a ``unix://`` Redis URL used to be probed
as a TCP host (``/run/mysqld/mysqld.sock:3306``), so the backend was reported down and skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.conf import settings

from tests.backends import (
    BACKENDS,
    STORE_INDEPENDENT,
    Endpoint,
    backend_of,
    missing_service,
    mysql_endpoint,
    postgres_endpoint,
    redis_endpoint,
    redis_url_with_db,
)

REQUIRE_SERVICES = os.environ.get("IDEMPOTENCY_TEST_REQUIRE_SERVICES") == "1"
MYSQL_SOCKET = os.environ.get("IDEMPOTENCY_TEST_MYSQL_SOCKET", "/run/mysqld/mysqld.sock")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Not tmp_path: a Unix socket path must stay under ~100 bytes.
    with tempfile.TemporaryDirectory(prefix="idem-sock-") as directory:
        yield Path(directory)


def _listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def _settings(**values: object) -> SimpleNamespace:
    return SimpleNamespace(**{"STORE_BACKEND": "db", **values})


def test_a_mysql_socket_path_is_probed_as_that_socket(socket_dir: Path) -> None:
    path = socket_dir / "mysqld.sock"
    db = {"HOST": str(path), "PORT": "3306"}
    down = missing_service(_settings(DB_BACKEND="mariadb", DATABASES={"default": db}))
    assert down == f"mariadb is not answering at {path}"
    with _listen(path):
        assert missing_service(_settings(DB_BACKEND="mariadb", DATABASES={"default": db})) is None


def test_a_postgres_socket_directory_is_probed_at_the_ports_socket(socket_dir: Path) -> None:
    db = {"HOST": str(socket_dir), "PORT": "6543"}
    with _listen(socket_dir / ".s.PGSQL.6543"):
        assert missing_service(_settings(DB_BACKEND="postgres", DATABASES={"default": db})) is None
    assert postgres_endpoint(f"{socket_dir}/", 5432) == Endpoint(path=f"{socket_dir}/.s.PGSQL.5432")


def test_a_unix_redis_url_is_probed_at_its_socket(socket_dir: Path) -> None:
    path = socket_dir / "redis.sock"
    redis_settings = _settings(
        DB_BACKEND="sqlite",
        STORE_BACKEND="redis",
        IDEMPOTENCY_CACHE_ALIAS="idempotency",
        CACHES={"idempotency": {"LOCATION": f"unix://{path}?db=15"}},
    )
    assert missing_service(redis_settings) == f"Redis is not answering at {path}"
    with _listen(path):
        assert missing_service(redis_settings) is None


def test_tcp_addresses_keep_host_and_port() -> None:
    assert str(mysql_endpoint("127.0.0.1", "3306")) == "127.0.0.1:3306"
    assert postgres_endpoint("db.internal", 5433) == Endpoint(host="db.internal", port=5433)
    assert redis_endpoint("redis://cache:6380/2") == Endpoint(host="cache", port=6380)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert not Endpoint(host="127.0.0.1", port=port).answers()


def test_a_redis_url_changes_database_in_its_own_syntax() -> None:
    assert redis_url_with_db("redis://127.0.0.1:6379/15", 14) == "redis://127.0.0.1:6379/14"
    assert redis_url_with_db("unix:///run/redis.sock?db=15", 14) == "unix:///run/redis.sock?db=14"
    assert redis_url_with_db("unix:///run/redis.sock", 3) == "unix:///run/redis.sock?db=3"


def test_runtests_probes_the_socket_in_the_environment(socket_dir: Path) -> None:
    path = socket_dir / "mysqld.sock"
    environ = {"MYSQL_HOST": str(path), "MYSQL_PORT": "3306"}
    assert BACKENDS["mariadb"].missing(environ) == [f"MariaDB at {path}"]
    with _listen(path):
        assert BACKENDS["mariadb"].missing(environ) == []


def test_a_tox_environment_name_selects_its_backend() -> None:
    assert backend_of("py310-django42-sqlite") == "sqlite"
    assert backend_of("py313-django6-redis") == "redis"
    assert backend_of("example-production") == "example-production"
    with pytest.raises(SystemExit, match="names no backend"):
        backend_of("lint")


def test_store_independent_modules_run_on_sqlite_only_unless_tests_are_named() -> None:
    tests_dir = Path(__file__).resolve().parent
    assert all((tests_dir / module).is_file() for module in STORE_INDEPENDENT)
    ignored = {f"--ignore=tests/{module}" for module in STORE_INDEPENDENT}
    assert not ignored & set(BACKENDS["sqlite"].pytest_args())
    for name in ("postgres", "mariadb", "redis", "redis-store"):
        assert ignored <= set(BACKENDS[name].pytest_args()), name
        assert not ignored & set(BACKENDS[name].pytest_args(whole_suite=False)), name
    assert "tests/example" in BACKENDS["example"].pytest_args()


@pytest.mark.skipif(settings.DB_BACKEND != "mariadb", reason="runs on the mariadb backend")
def test_the_mariadb_suite_connects_over_the_socket() -> None:
    """The settings, the conftest probe and a real connection, with MYSQL_HOST a socket path."""
    if not Path(MYSQL_SOCKET).exists():
        message = f"no MariaDB socket at {MYSQL_SOCKET} (set IDEMPOTENCY_TEST_MYSQL_SOCKET)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    code = (
        "import django; django.setup()\n"
        "from django.conf import settings\n"
        "from django.db import connection\n"
        "from tests.backends import missing_service\n"
        "assert missing_service(settings) is None, missing_service(settings)\n"
        "with connection.cursor() as cursor:\n"
        "    cursor.execute('SELECT 1')\n"
        "    print('connected', cursor.fetchone()[0], connection.connection.unix_socket)\n"
    )
    env = dict(
        os.environ,
        MYSQL_HOST=MYSQL_SOCKET,
        MYSQL_DATABASE="",
        DJANGO_SETTINGS_MODULE="tests.settings",
    )
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"connected 1 {MYSQL_SOCKET}"


def test_the_installed_package_guard_refuses_a_package_outside_site_packages(
    tmp_path: Path,
) -> None:
    """tox sets IDEMPOTENCY_TEST_INSTALLED_PACKAGE=1: a checkout first on the path must stop it."""
    shadow = tmp_path / "django_idempotency"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    tests_parent = Path(__file__).parent.parent
    env = dict(
        os.environ,
        IDEMPOTENCY_TEST_INSTALLED_PACKAGE="1",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(tests_parent)]),
    )
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", "import tests.settings"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"django_idempotency comes from {shadow.resolve()}/__init__.py" in result.stderr
