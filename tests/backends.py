"""The test matrix in one table: each backend's environment variables and the servers it needs.

``runtests.py``, ``tox.ini`` and ``tests/conftest.py`` all read this module, so a backend is
defined once. It uses the standard library only: ``runtests.py`` imports it before any
virtualenv exists, and tox runs it as a script before the suite starts::

    python tests/backends.py env py312-django52-postgres          # print the variables
    python tests/backends.py run py312-django52-postgres -- CMD   # run CMD with them
    python tests/backends.py stage DEST                           # copy tests/ into DEST

A tox environment name selects the backend by its last factor (``postgres`` above).

Servers are found where ``tests/settings.py`` looks for them, and an address is either a TCP
host and port or a Unix socket, written the way each client library spells it: a ``PGHOST``
that starts with ``/`` is the directory holding PostgreSQL's socket, a ``MYSQL_HOST`` that
starts with ``/`` is MariaDB's socket file, and a ``unix://`` Redis URL names Redis's socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens: ``host`` and ``port`` over TCP, or ``path`` of a Unix socket."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return self.path or f"{self.host}:{self.port}"

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether something accepts a connection here (the server may still refuse to log in)."""
        try:
            if self.path:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(timeout)
                    sock.connect(self.path)
            else:
                with socket.create_connection((self.host, self.port), timeout=timeout):
                    pass
        except OSError:
            return False
        return True


def postgres_endpoint(host: str, port: str | int) -> Endpoint:
    # libpq: a host starting with "/" is a directory; the socket in it is named after the port.
    if host.startswith("/"):
        return Endpoint(path=f"{host.rstrip('/')}/.s.PGSQL.{port}")
    return Endpoint(host=host, port=int(port))


def mysql_endpoint(host: str, port: str | int) -> Endpoint:
    # Django's MySQL backend passes a HOST starting with "/" as the client's unix_socket.
    if host.startswith("/"):
        return Endpoint(path=host)
    return Endpoint(host=host, port=int(port))


def redis_endpoint(url: str) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return Endpoint(path=parts.path)
    return Endpoint(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)


def redis_url_with_db(url: str, db: int) -> str:
    """``url`` pointing at database ``db``: in the path for TCP, in the query for a socket."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"] + [("db", str(db))]
        # urlunsplit would drop the empty authority and write "unix:/path".
        return f"unix://{parts.path}?{urlencode(query)}"
    return urlunsplit(parts._replace(path=f"/{db}"))


def postgres_from_env(environ: Mapping[str, str]) -> Endpoint:
    return postgres_endpoint(environ.get("PGHOST", "127.0.0.1"), environ.get("PGPORT", "5432"))


def mariadb_from_env(environ: Mapping[str, str]) -> Endpoint:
    return mysql_endpoint(environ.get("MYSQL_HOST", "127.0.0.1"), environ.get("MYSQL_PORT", "3306"))


def redis_from_env(environ: Mapping[str, str]) -> Endpoint:
    return redis_endpoint(environ.get("IDEMPOTENCY_TEST_REDIS_URL", DEFAULT_REDIS_URL))


def example_redis_from_env(environ: Mapping[str, str]) -> Endpoint:
    return redis_endpoint(environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/1"))


SERVERS: dict[str, Callable[[Mapping[str, str]], Endpoint]] = {
    "PostgreSQL": postgres_from_env,
    "MariaDB": mariadb_from_env,
    "Redis": redis_from_env,
    "the example's Redis": example_redis_from_env,
}


#: Modules whose tests read no database and no store of their own (the HTTP client, the
#: fingerprint and key parsers, the OpenAPI schema, the memory store, the testing helpers,
#: problem responses, metrics): the matrix runs them on one backend, SQLite, not on every one.
STORE_INDEPENDENT = (
    "test_client.py",
    "test_fingerprint.py",
    "test_keys.py",
    "test_openapi.py",
    "test_prometheus.py",
    "test_responses.py",
    "test_storage_memory.py",
    "test_testing.py",
)


@dataclass(frozen=True)
class Backend:
    """One column of the matrix: what ``tests/settings.py`` is told and which servers it needs."""

    env: dict[str, str]
    servers: tuple[str, ...] = ()
    #: ``main`` is the package suite (tests/ without tests/example); ``example`` the example's.
    suite: str = "main"
    #: Whether the matrix runs the ``STORE_INDEPENDENT`` modules here too.
    everything: bool = False

    def pytest_args(self, *, whole_suite: bool = True) -> list[str]:
        """What ``runtests.py`` passes to pytest for this backend, before the caller's own.

        ``whole_suite`` False (the caller chose tests or options) keeps every module, so that a
        test named on the command line runs wherever it was asked to.
        """
        if self.suite == "example":
            return ["-p", "no:randomly", "--ds=tests.example.settings", "tests/example"]
        skipped = []
        if whole_suite and not self.everything:
            skipped = [f"--ignore=tests/{module}" for module in STORE_INDEPENDENT]
        return ["--ignore=tests/example", *skipped]

    def endpoints(self, environ: Mapping[str, str] = os.environ) -> dict[str, Endpoint]:
        merged = {**environ, **self.env}
        return {name: SERVERS[name](merged) for name in self.servers}

    def missing(self, environ: Mapping[str, str] = os.environ) -> list[str]:
        """The servers that do not answer, as "name at address"."""
        return [
            f"{name} at {endpoint}"
            for name, endpoint in self.endpoints(environ).items()
            if not endpoint.answers(timeout=2)
        ]


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend(
        {"IDEMPOTENCY_TEST_DB": "sqlite", "IDEMPOTENCY_TEST_STORE": "db"}, everything=True
    ),
    "postgres": Backend(
        {"IDEMPOTENCY_TEST_DB": "postgres", "IDEMPOTENCY_TEST_STORE": "db"}, ("PostgreSQL",)
    ),
    "mariadb": Backend(
        {"IDEMPOTENCY_TEST_DB": "mariadb", "IDEMPOTENCY_TEST_STORE": "db"}, ("MariaDB",)
    ),
    "redis": Backend(
        {"IDEMPOTENCY_TEST_DB": "sqlite", "IDEMPOTENCY_TEST_STORE": "redis"}, ("Redis",)
    ),
    "redis-store": Backend(
        {"IDEMPOTENCY_TEST_DB": "sqlite", "IDEMPOTENCY_TEST_STORE": "redisstore"}, ("Redis",)
    ),
    # The example project's own tests, with its own settings: SQLite, then PostgreSQL + Redis.
    "example": Backend({"EXAMPLE_BACKEND": "sqlite"}, suite="example"),
    "example-production": Backend(
        {"EXAMPLE_BACKEND": "production"}, ("PostgreSQL", "the example's Redis"), suite="example"
    ),
}


def missing_service(settings: object) -> str | None:
    """Why the backend that Django ``settings`` select cannot run here, or None when it can.

    Reads the addresses from the settings themselves, so that what is probed is what the suite
    will connect to.
    """
    db_backend = getattr(settings, "DB_BACKEND", "sqlite")
    if db_backend in ("postgres", "mariadb"):
        db = settings.DATABASES["default"]  # type: ignore[attr-defined]
        to_endpoint = postgres_endpoint if db_backend == "postgres" else mysql_endpoint
        endpoint = to_endpoint(db["HOST"], db["PORT"] or 0)
        if not endpoint.answers():
            return f"{db_backend} is not answering at {endpoint}"
    if getattr(settings, "STORE_BACKEND", "db") == "redisstore":
        endpoint = redis_endpoint(settings.IDEMPOTENCY_REDIS_URL)  # type: ignore[attr-defined]
        if not endpoint.answers():
            return f"Redis is not answering at {endpoint}"
    if getattr(settings, "STORE_BACKEND", "db") == "redis":
        alias = settings.IDEMPOTENCY_CACHE_ALIAS  # type: ignore[attr-defined]
        endpoint = redis_endpoint(settings.CACHES[alias]["LOCATION"])  # type: ignore[attr-defined]
        if not endpoint.answers():
            return f"Redis is not answering at {endpoint}"
    return None


def backend_of(env_name: str) -> str:
    """The backend a tox environment name ends with (``py310-django42-sqlite`` → ``sqlite``)."""
    factors = env_name.split("-")
    for start in range(len(factors)):
        if (name := "-".join(factors[start:])) in BACKENDS:
            return name
    raise SystemExit(f"{env_name!r} names no backend; use one of {', '.join(BACKENDS)}")


def stage(destination: Path) -> None:
    """Copy the ``tests`` package, alone, into ``destination``.

    tox runs the suite from there so that ``tests`` is importable while ``django_idempotency``
    can only come from the installed wheel: the checkout's copy is never on ``sys.path``.
    A copy rather than a symlink, because tests that resolve their own path must land here too.
    """
    target = destination / "tests"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(
        Path(__file__).resolve().parent,
        target,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "example"),
    )


def _into_stage(arg: str) -> str:
    """``arg`` made to name the staged copy when it names a file of this checkout's tests/.

    tox rewrites a path given after ``--`` relative to the env's directory, so
    ``tox -e ENV -- tests/test_keys.py`` arrives here as ``../../../tests/test_keys.py``: the
    checkout's file, which pytest refuses next to the staged conftest of the same name.
    """
    path, sep, node = arg.partition("::")
    if not path or path.startswith("-"):
        return arg
    source = Path(__file__).resolve().parent
    candidate = Path(path).resolve()
    if candidate != source and not candidate.is_relative_to(source):
        return arg
    return str(Path("tests") / candidate.relative_to(source)) + sep + node


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "stage":
        stage(Path(argv[1]))
        return 0
    if len(argv) >= 2 and argv[0] == "env":
        for name, value in BACKENDS[backend_of(argv[1])].env.items():
            print(f"{name}={value}")
        return 0
    if len(argv) >= 4 and argv[0] == "run" and argv[2] == "--":
        env = {**os.environ, **BACKENDS[backend_of(argv[1])].env}
        command = [_into_stage(arg) for arg in argv[3:]]
        return subprocess.run(command, env=env, check=False).returncode  # noqa: S603
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
