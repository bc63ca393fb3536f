"""HTTP faults on real sockets for the client tests: lost answers, scripted servers, silence.

``DroppingProxy`` sits in front of a real server and loses answers *after* the server gave
them: it reads the whole response from upstream, then closes the client's socket without
forwarding a byte, which is what a client sees when a load balancer or a mobile network drops
the connection on the way back. The request has run; only its answer is gone.

``ScriptedServer`` answers each connection with the next canned response (the last one
repeats) and notes when each request arrived, to time a client's retries. With no script it
never answers, to test timeouts and deadlines.

Every wait is bounded; everything runs on 127.0.0.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

#: Upper bound for one upstream answer or one client request to arrive.
IO_TIMEOUT = 30.0


@dataclass(frozen=True)
class Seen:
    """One request as it reached the fault, with when it arrived (``time.monotonic()``)."""

    at: float
    head: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            field, _, value = line.partition(b":")
            if field.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None

    @property
    def method(self) -> str:
        return self.head.split(b" ", 1)[0].decode()


def read_request(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read one request (head and Content-Length body) from ``sock``: ``(head, body)``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = Seen(0.0, head).header("Content-Length")
    while length is not None and len(body) < int(length):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body


class _Listener:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.settimeout(IO_TIMEOUT)
            with self._lock:
                if self._closed:
                    client.close()
                    return
                self._open.append(client)
            threading.Thread(target=self._serve_and_close, args=(client,), daemon=True).start()

    def _serve_and_close(self, client: socket.socket) -> None:
        try:
            self._serve(client)
        except OSError:
            pass
        finally:
            with self._lock:
                if client in self._open:
                    self._open.remove(client)
            client.close()

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def _note(self, head: bytes) -> None:
        with self._lock:
            self.seen.append(Seen(time.monotonic(), head))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._open = self._open, []
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DroppingProxy(_Listener):
    """Forwards each request to ``target``; loses the first ``drop`` answers after they came.

    The upstream must close the connection after its answer (gunicorn's sync workers do), so
    that "the whole answer" is everything up to the upstream's EOF.
    """

    def __init__(self, target_port: int, drop: int) -> None:
        self.target_port = target_port
        self.to_drop = drop
        self.dropped = 0
        self.forwarded = 0
        super().__init__()

    def _serve(self, client: socket.socket) -> None:
        head, body = read_request(client)
        if not head:
            return
        self._note(head)
        with socket.create_connection(("127.0.0.1", self.target_port), IO_TIMEOUT) as upstream:
            upstream.sendall(head + b"\r\n\r\n" + body)
            answer = b""
            while chunk := upstream.recv(65536):
                answer += chunk
        with self._lock:
            drop = self.to_drop > 0
            if drop:
                self.to_drop -= 1
                self.dropped += 1
            else:
                self.forwarded += 1
        if not drop:
            client.sendall(answer)


class ScriptedServer(_Listener):
    """Answers the n-th request with ``script[n]`` (the last repeats); silent with no script."""

    def __init__(self, *script: bytes) -> None:
        self.script = list(script)
        super().__init__()

    def _serve(self, client: socket.socket) -> None:
        head, _ = read_request(client)
        if not head:
            return
        self._note(head)
        if not self.script:
            # Say nothing until the client gives up (or the test closes the server).
            with contextlib.suppress(OSError):
                client.recv(1)
            return
        with self._lock:
            answer = self.script[min(len(self.seen), len(self.script)) - 1]
        client.sendall(answer)


def http_answer(status: int, *headers: str, body: bytes = b"") -> bytes:
    reasons = {201: "Created", 409: "Conflict", 422: "Unprocessable Content", 503: "Unavailable"}
    lines = [f"HTTP/1.1 {status} {reasons.get(status, 'Status')}", *headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
