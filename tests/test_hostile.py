"""Hostile input against a real server: property-based, bounded, part of every matrix run.

Hypothesis draws header values (empty, 10,000 characters, non-ASCII, control characters, quotes,
commas, two header lines), bodies (invalid, deeply nested and valid JSON, binary, a wrong content
type, form, multipart with a fresh boundary, oversized), methods and paths, and sends them over
raw sockets (``http.client``, so bytes headers and repeated header lines reach the server as
drawn) to gunicorn sync workers serving the test project on the configured database and store.

What must hold, for every request:

* no ``500`` that the layer causes (only a view that breaks on its own input may answer one);
* a malformed key on a protected operation is refused with ``400 idempotency-key-invalid``
  (or by gunicorn itself, before Django), and no record is created: the store was not touched;
* a replay is only ever the stored answer of the same request: a model keeps, per key, the
  first stored response and the fingerprint-relevant parts of its request (method, path with
  query, media type, body content: a form by its fields and files, anything else by its bytes),
  computed here independently of the package's fingerprint code.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed ('.[test]')")
pytest.importorskip("gunicorn", reason="gunicorn is not installed ('.[test]')")

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.client import encode_multipart  # noqa: E402
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from django_idempotency.exceptions import KeyInvalid  # noqa: E402
from django_idempotency.keys import parse_key  # noqa: E402
from django_idempotency.models import IdempotencyKey  # noqa: E402
from tests.behaviour import ENTRIES  # noqa: E402

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
MAX_BODY = 16 * 1024  # the server's DATA_UPLOAD_MAX_MEMORY_SIZE in this test
BUDGET_SECONDS = 60
TIMEOUT = 20
ENTRY_PATHS = [entry.url for entry in ENTRIES]
TRANSIENT = {401, 403, 408, 409, 425, 429}


# --- the server -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Two sync gunicorn workers on 127.0.0.1, started and stopped by their master's PID."""
    port = _free_port()
    log = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "IDEMPOTENCY_SERVE_DB_NAME": str(connection.settings_dict["NAME"]),
        "IDEMPOTENCY_SERVE_MAX_BODY": str(MAX_BODY),
    }
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers=2",
        "--worker-class=sync",
        f"--bind=127.0.0.1:{port}",
        "--timeout=30",
        # Let a 10,000-character header through to Django, where the layer must refuse it.
        "--limit-request-field_size=16384",
        "tests.wsgi:application",
    ]
    with log.open("w") as stderr:
        process = subprocess.Popen(  # noqa: S603 - our own command line, no shell
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, f"gunicorn exited:\n{log.read_text()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, f"gunicorn did not start:\n{log.read_text()}"
            time.sleep(0.1)
        yield port, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=TIMEOUT)


# --- what is sent -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    method: str
    path: str
    headers: tuple[tuple[str, bytes], ...] = field(repr=False)
    body: bytes = field(repr=False)
    content_type: str | None
    #: The body's content as a form (names sorted, one name's values in order), if it is one.
    form: Any
    kind: str

    def __repr__(self) -> str:
        headers = [(n, v[:60]) for n, v in self.headers]
        return f"<{self.method} {self.path} {self.kind} {headers} body={self.body[:120]!r}>"

    def relevant(self) -> tuple[Any, ...]:
        media = (self.content_type or "").split(";", 1)[0].strip().lower()
        return (self.method, self.path, media, self.form if self.form is not None else self.body)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem_type(self) -> str | None:
        if self.headers.get("content-type") != "application/problem+json":
            return None
        return str(json.loads(self.body)["type"]).rsplit("#", 1)[-1]


def send(port: int, sent: Sent) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.putrequest(sent.method, sent.path, skip_accept_encoding=True)
        for name, value in sent.headers:
            conn.putheader(name, value)
        if sent.content_type is not None:
            conn.putheader("Content-Type", sent.content_type)
        conn.putheader("Content-Length", str(len(sent.body)))
        conn.endheaders(sent.body)
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Answer(response.status, headers, response.read())
    finally:
        conn.close()


# Keys come from a small pool, so that retries, reuses and both spellings of one key meet.
POOL = ["pay-1", "pay-2", "8e03978e-40d5-43e8-bc93-6894a57f9324"]
valid_keys = st.one_of(
    st.sampled_from(POOL),
    st.sampled_from(POOL).map(lambda k: f'"{k}"'),
    st.sampled_from(POOL).map(lambda k: f'"{k}";v=1'),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=',"'),
        min_size=1,
        max_size=40,
    ),
)
malformed_keys = st.one_of(
    st.just(""),
    st.just("k" * 10_000),
    st.text(st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF), min_size=1, max_size=8),
    st.sampled_from(["a\x01b", "a\x7fb", "tab\tinside", "\x00", "a b"]),
    st.sampled_from(['"open', 'a"b', '"a"b', '"bad\\escape"', '"x";P=1', '"x" ;v=1']),
    st.sampled_from(["a,b", '"a", "b"', "a, b"]),
)


@st.composite
def bodies(draw: Any) -> tuple[bytes, str | None, Any, str]:
    """(body, content type, form content or None, kind)."""
    kind = draw(
        st.sampled_from(
            [
                "json",
                "json",
                "invalid-json",
                "nested-json",
                "binary",
                "wrong-type",
                "form",
                "multipart",
                "bad-multipart",
                "oversized",
                "empty",
            ]
        )
    )
    if kind == "json":
        amount = draw(st.integers(-5, 50))
        return json.dumps({"amount": amount}).encode(), "application/json", None, kind
    if kind == "invalid-json":
        return (
            draw(st.sampled_from([b"{", b'{"amount": }', b"\xff\xfe"])),
            "application/json",
            None,
            kind,
        )
    if kind == "nested-json":
        depth = draw(st.sampled_from([100, 5000]))
        return b"[" * depth + b"]" * depth, "application/json", None, kind
    if kind == "binary":
        return draw(st.binary(max_size=200)), "application/octet-stream", None, kind
    if kind == "wrong-type":
        return b'{"amount": 10}', draw(st.sampled_from(["text/plain", "image/png"])), None, kind
    if kind == "empty":
        return b"", draw(st.sampled_from([None, "application/json"])), None, kind
    if kind == "oversized":
        return (
            b'{"amount": 1, "pad": "' + b"x" * (MAX_BODY + 10) + b'"}',
            "application/json",
            None,
            kind,
        )
    names = st.sampled_from(["amount", "note", "tag"])
    values = st.sampled_from(["10", "11", "", "x y", "é"])
    pairs = draw(st.lists(st.tuples(names, values), max_size=4))
    if kind == "form":
        from urllib.parse import urlencode

        body = urlencode(pairs).encode()
        return body, "application/x-www-form-urlencoded", _form(pairs, []), kind
    files = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["doc", "amount"]),
                st.sampled_from(["a.txt", "b.pdf"]),
                st.binary(max_size=30),
            ),
            max_size=2,
        )
    )
    boundary = uuid.uuid4().hex  # new per attempt, as browsers and requests do
    if kind == "bad-multipart":
        return b"--nope\r\nnot a part\r\n", f"multipart/form-data; boundary={boundary}", None, kind
    data: dict[str, list[Any]] = {}
    for name, value in pairs:
        data.setdefault(name, []).append(value)
    from django.core.files.uploadedfile import SimpleUploadedFile

    for name, file_name, content in files:
        data.setdefault(name, []).append(SimpleUploadedFile(file_name, content, "text/plain"))
    body = encode_multipart(boundary, data)
    # encode_multipart writes each name's values in order, and our model sorts by name.
    form = _form(pairs, [(n, f, c) for n, f, c in files])
    if not pairs and not files:
        form = None  # an empty multipart body is no form: it counts by its bytes
    return body, f"multipart/form-data; boundary={boundary}", form, kind


def _form(pairs: list[tuple[str, str]], files: list[tuple[str, str, bytes]]) -> Any:
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    uploads: dict[str, list[tuple[str, bytes]]] = {}
    for name, file_name, content in files:
        uploads.setdefault(name, []).append((file_name, content))
    return (
        tuple(sorted((k, tuple(v)) for k, v in fields.items())),
        tuple(sorted((k, tuple(v)) for k, v in uploads.items())),
    )


@st.composite
def requests_(draw: Any) -> tuple[Sent, str, bool]:
    """A request, whether its key is well-formed ("valid", "malformed", "none"), and a repeat."""
    method = draw(st.sampled_from(["POST", "POST", "POST", "PATCH", "PUT", "GET", "DELETE"]))
    path = draw(st.sampled_from([*ENTRY_PATHS, "/nowhere/", "/mixin/payments/?amount=1"]))
    key_kind = draw(st.sampled_from(["valid", "valid", "malformed", "none"]))
    headers: list[tuple[str, bytes]] = []
    if key_kind == "valid":
        headers.append(("Idempotency-Key", draw(valid_keys).encode()))
    elif key_kind == "malformed":
        if draw(st.booleans()):
            headers.append(("Idempotency-Key", draw(malformed_keys).encode("utf-8")))
        else:  # two header lines, each well-formed alone
            headers += [("Idempotency-Key", b"pay-1"), ("idempotency-key", b"pay-2")]
    body, content_type, form, kind = draw(bodies())
    sent = Sent(method, path, tuple(headers), body, content_type, form, kind)
    return sent, key_kind, draw(st.booleans())


# --- the store, seen from the test process ----------------------------------------------------


def record_count() -> int:
    if settings.STORE_BACKEND == "redis":
        from django.core.cache import caches

        keys: list[str] = caches[settings.IDEMPOTENCY_CACHE_ALIAS].keys("*")  # type: ignore[attr-defined]
        return len(keys)
    if settings.STORE_BACKEND == "redisstore":
        from django_idempotency.storage import get_storage

        client = get_storage().client  # type: ignore[attr-defined]
        return len(list(client.scan_iter(match=f"{settings.IDEMPOTENCY_REDIS_KEY_PREFIX}*")))
    return int(IdempotencyKey.objects.count())


@dataclass
class Model:
    #: key -> (the request that stored a result, that result)
    stored: dict[str, tuple[Sent, Answer]] = field(default_factory=dict)
    checked: int = 0
    replays: int = 0
    mismatches: int = 0


def _key_of(sent: Sent) -> str | None:
    values = [v for n, v in sent.headers if n.lower() == "idempotency-key"]
    if len(values) != 1:
        return None
    try:
        return parse_key(values[0].decode("latin-1"))
    except KeyInvalid:
        return None


def check(model: Model, sent: Sent, key_kind: str, answer: Answer, log: Path) -> None:
    where = f"{sent.method} {sent.path} [{sent.kind}] -> {answer.status} {answer.body[:300]!r}"
    # Every entry point protects POST and PATCH (the default methods) at these paths; a viewset
    # without a PATCH handler claims the key before DRF answers 405, and stores that.
    protected = sent.method in ("POST", "PATCH") and sent.path.split("?")[0] in ENTRY_PATHS
    if answer.status >= 500:
        # A view may break on its own input (DRF's JSON parser recurses into deep nesting), never
        # on anything the layer did.
        assert sent.kind == "nested-json", f"server error: {where}\n{log.read_text()[-3000:]}"
    key = _key_of(sent)
    if key_kind == "malformed" or (key_kind == "valid" and key is None):
        if protected:
            assert answer.status == 400, where
            # gunicorn refuses some header bytes itself, before Django; Django must say why.
            if answer.problem_type() is not None:
                assert answer.problem_type() == "idempotency-key-invalid", where
        return
    if answer.headers.get("idempotent-replayed") == "true":
        model.replays += 1
        assert key is not None and key in model.stored, f"replay of nothing: {where}"
        first, result = model.stored[key]
        assert first.relevant() == sent.relevant(), f"replay for another request: {where}"
        assert (answer.status, answer.body) == (result.status, result.body), where
        return
    if key is None or not protected:
        return
    assert answer.problem_type() != "idempotency-key-invalid", f"a valid key refused: {where}"
    if sent.kind == "oversized":
        # Too large to fingerprint, so it is compared with nothing: refused before the store.
        assert answer.status == 413, where
        assert answer.problem_type() == "idempotency-request-too-large", where
        return
    model.checked += 1
    if key in model.stored:
        first, result = model.stored[key]
        if first.relevant() != sent.relevant():
            model.mismatches += 1
            assert answer.status == 422, where
            assert answer.problem_type() == "idempotency-key-reused", where
        else:
            raise AssertionError(f"the same request ran again instead of replaying: {where}")
    elif answer.status in (201, 400) and answer.problem_type() is None:
        # A created payment or the view's own validation error: final, so stored.
        model.stored[key] = (sent, answer)
    elif answer.status < 500 and answer.status not in TRANSIENT and answer.problem_type() is None:
        # Final too (a 404, 405 or 415 of the view): stored, but its exact status is not ours to
        # predict, so the model learns it from the replay it then expects.
        model.stored[key] = (sent, answer)


def test_hostile_requests_against_gunicorn(gunicorn: tuple[int, Path]) -> None:
    port, log = gunicorn
    model = Model()
    started = time.monotonic()

    @hypothesis_settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(requests_())
    def run(drawn: tuple[Sent, str, bool]) -> None:
        sent, key_kind, repeat = drawn
        if time.monotonic() - started > BUDGET_SECONDS:
            return  # bounded in time as well as in count
        for _ in range(2 if repeat else 1):
            before = record_count()
            answer = send(port, sent)
            if key_kind == "malformed":
                assert record_count() == before, f"a malformed key touched the store: {sent}"
            check(model, sent, key_kind, answer, log)

    run()
    # The run must have exercised what it claims to, or it proves nothing.
    assert model.checked > 10, model
    assert model.replays > 0, model
