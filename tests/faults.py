"""A TCP proxy whose plug a test can pull: real connection failures, no mocks.

Put it between a client and a real server (Redis here), run traffic through it, then ``cut()``:
open connections are reset and new ones are refused, exactly as when the server goes away.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._cut:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """The server is gone: reset every open connection and refuse new ones."""
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@contextlib.contextmanager
def unreachable_database(alias: str = "unreachable") -> Iterator[str]:
    """A database alias whose real driver fails to connect, as when the server is down.

    The wrapper is made by hand rather than declared in DATABASES, so the test runner neither
    creates a test database for it nor forbids connecting to it.
    """
    from django.db import connections
    from django.db.utils import load_backend

    params = dict(connections["default"].settings_dict)
    if params["ENGINE"].endswith("sqlite3"):
        params["NAME"] = "/nonexistent-dir/idempotency.sqlite3"
    else:
        params.update(HOST="127.0.0.1", PORT="1")  # nothing listens there
    wrapper = load_backend(params["ENGINE"]).DatabaseWrapper(params, alias)
    connections[alias] = wrapper
    try:
        yield alias
    finally:
        wrapper.close()
        del connections[alias]


@contextlib.contextmanager
def store_unreachable() -> Iterator[None]:
    """Point the configured store (whichever the matrix runs) at a server that is not there."""
    from django.conf import settings
    from django.test import override_settings

    if settings.STORE_BACKEND == "db":
        with unreachable_database() as alias, override_settings(IDEMPOTENCY_DATABASE=alias):
            yield
    elif settings.STORE_BACKEND == "redisstore":
        with override_settings(
            IDEMPOTENCY_REDIS_URL="redis://127.0.0.1:1/0?socket_connect_timeout=1&socket_timeout=1"
        ):
            yield
    else:
        caches = {
            **settings.CACHES,
            "unreachable": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": "redis://127.0.0.1:1/0",
                "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
            },
        }
        with override_settings(CACHES=caches, IDEMPOTENCY_CACHE_ALIAS="unreachable"):
            yield
