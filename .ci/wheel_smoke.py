"""Install a built wheel in a clean virtualenv and use it as a new project would.

    python3 .ci/wheel_smoke.py dist/django_idempotency-*.whl

Nothing from the checkout is importable: a throw-away project is generated in a temporary
directory, the wheel (not the source tree) is installed with its dependencies from the package
index, then ``manage.py check``, ``migrate`` and ``makemigrations --check`` run and a real
``runserver`` answers one keyed POST, its retry (a replay) and a reuse with another body (422).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

SETTINGS = """
SECRET_KEY = "wheel-smoke-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
USE_TZ = True
ROOT_URLCONF = "smoke.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "rest_framework",
    "django_idempotency",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "smoke.sqlite3"}}
REST_FRAMEWORK = {"DEFAULT_AUTHENTICATION_CLASSES": [], "UNAUTHENTICATED_USER": None}
"""

URLS = """
from django.contrib.auth.models import Group
from django.urls import path
from rest_framework.decorators import api_view
from rest_framework.response import Response

from django_idempotency import idempotent


@api_view(["POST"])
@idempotent(required=True)
def create_group(request):
    group = Group.objects.create(name=request.data["name"])
    return Response({"id": group.pk, "groups": Group.objects.count()}, status=201)


urlpatterns = [path("groups/", create_group)]
"""

MANAGE = """
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "smoke.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""


def run(*command: str | Path, cwd: Path) -> str:
    print("wheel smoke: $", " ".join(str(part) for part in command), flush=True)
    result = subprocess.run(  # noqa: S603
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"wheel smoke FAILED:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(port: int, body: dict[str, str], key: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(  # noqa: S310  # a loopback http URL built here
        f"http://127.0.0.1:{port}/groups/",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def serve_and_request(python: Path, project: Path) -> None:
    port = free_port()
    server = subprocess.Popen(  # noqa: S603
        [str(python), "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("wheel smoke FAILED: runserver did not answer") from None
                time.sleep(0.3)
        first = post(port, {"name": "payments"}, "smoke-1")
        retry = post(port, {"name": "payments"}, "smoke-1")
        reused = post(port, {"name": "refunds"}, "smoke-1")
        missing = post(port, {"name": "refunds"}, "")
    finally:
        server.terminate()
        log, _ = server.communicate(timeout=30)
    checks = [
        (first[0] == 201 and json.loads(first[2])["groups"] == 1, f"first: {first}"),
        (
            retry[0] == 201 and retry[2] == first[2] and retry[1].get("Idempotent-Replayed"),
            f"retry: {retry}",
        ),
        (reused[0] == 422 and b"idempotency-key-reused" in reused[2], f"reused: {reused}"),
        (missing[0] == 400, f"missing key: {missing}"),
    ]
    failures = [message for passed, message in checks if not passed]
    if failures:
        raise SystemExit("wheel smoke FAILED:\n  " + "\n  ".join(failures) + f"\n{log}")
    print(
        "wheel smoke: runserver answered 201, replayed it, refused a reuse (422) and no key (400)"
    )


def main(wheel: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="wheel-smoke-") as tmp:
        root = Path(tmp)
        env_dir = root / "venv"
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = env_dir / "bin" / "python"
        run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=root)
        where = run(
            python, "-I", "-c", "import django_idempotency as m; print(m.__file__)", cwd=root
        )
        if not Path(where.strip()).is_relative_to(env_dir):
            raise SystemExit(f"wheel smoke FAILED: imported {where.strip()}, not the wheel")

        project = root / "project"
        (project / "smoke").mkdir(parents=True)
        (project / "smoke" / "__init__.py").write_text("")
        (project / "smoke" / "settings.py").write_text(textwrap.dedent(SETTINGS))
        (project / "smoke" / "urls.py").write_text(textwrap.dedent(URLS))
        (project / "manage.py").write_text(textwrap.dedent(MANAGE))

        run(python, "manage.py", "check", "--fail-level", "WARNING", cwd=project)
        run(python, "manage.py", "migrate", "-v", "0", cwd=project)
        # The shipped migrations match the shipped models.
        run(python, "manage.py", "makemigrations", "--check", "--dry-run", cwd=project)
        serve_and_request(python, project)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]).resolve())
