#!/usr/bin/env python3
"""Run the example shop from a fresh clone with one command: ``python3 example_project/run.py``.

Only the Python standard library is used here, because nothing else is installed yet. The steps:

1. create a virtualenv in ``example_project/.venv`` (apart from any development virtualenv, so
   the example never changes the packages a contributor tests with);
2. install this checkout into it (``pip install -e .`` plus what the chosen backend needs);
3. ``migrate``, then ``seed_demo`` (prints the demo user's password and API token);
4. serve on http://127.0.0.1:8000/ with ``runserver``.

Every step is safe to repeat. A second run skips pip when neither ``pyproject.toml`` nor the
requirements changed, so it starts in a few seconds. ``--no-serve`` stops after step 3 (tests),
``--reinstall`` forces step 2. ``EXAMPLE_BACKEND=production`` (see ``settings.py``) uses
PostgreSQL and the Redis cache store instead of SQLite and the ORM store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VENV = HERE / ".venv"
MINIMUM_PYTHON = (3, 10)
# What each backend needs on top of the package itself.
# The openapi extra (drf-spectacular and its sidecar) serves /api/schema/ and /api/docs/.
REQUIREMENTS = {
    "sqlite": ["-e", f"{REPO}[openapi]"],
    "production": ["-e", f"{REPO}[redis,openapi]", "psycopg[binary]>=3.1"],
}
STAMP_NAME = ".example-installed.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=int(os.environ.get("EXAMPLE_PORT", "8000")))
    parser.add_argument(
        "--venv", type=Path, default=DEFAULT_VENV, help="virtualenv to create or reuse"
    )
    parser.add_argument("--no-serve", action="store_true", help="set up, seed, and stop")
    parser.add_argument("--no-reload", action="store_true", help="runserver without autoreload")
    parser.add_argument("--reinstall", action="store_true", help="run pip even if up to date")
    args = parser.parse_args(argv)

    if sys.version_info < MINIMUM_PYTHON:
        wanted = ".".join(map(str, MINIMUM_PYTHON))
        print(f"run.py needs Python {wanted} or newer; this is {sys.version.split()[0]}.")
        return 2
    backend = os.environ.get("EXAMPLE_BACKEND", "sqlite")
    if backend not in REQUIREMENTS:
        print(f"EXAMPLE_BACKEND={backend!r}: use sqlite (the default) or production.")
        return 2

    python = ensure_venv(args.venv.resolve())
    ensure_installed(python, backend, force=args.reinstall)
    manage = [str(python), str(HERE / "manage.py")]
    if backend == "production" and os.environ.get("EXAMPLE_DATABASE", "postgres") == "postgres":
        ensure_postgres_database(python)
    step("Applying migrations")
    run([*manage, "migrate", "--noinput", "-v", "1"])
    step("Seeding the demo data")
    run([*manage, "seed_demo", "--base-url", f"http://{args.host}:{args.port}"])
    if args.no_serve:
        print("Set up; not serving (--no-serve).")
        return 0
    step(f"Serving on http://{args.host}:{args.port}/ (Ctrl+C stops it)")
    command = [*manage, "runserver", f"{args.host}:{args.port}"]
    if args.no_reload:
        command.append("--noreload")
    sys.stdout.flush()
    if os.name == "posix":
        # Become the server process, so that whoever started run.py can stop the server by its id.
        os.execv(command[0], command)  # noqa: S606 - our own command line, no shell
    return subprocess.call(command)  # noqa: S603 - our own command line, no shell


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(command: list[str]) -> None:
    completed = subprocess.run(command, check=False)  # noqa: S603 - built here, no shell
    if completed.returncode != 0:
        raise SystemExit(f"run.py: this step failed ({completed.returncode}): {' '.join(command)}")


def venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(path: Path) -> Path:
    python = venv_python(path)
    if python.exists():
        return python
    step(f"Creating a virtualenv in {path}")
    try:
        venv.EnvBuilder(with_pip=True).create(path)
    except (OSError, subprocess.CalledProcessError) as exc:
        # Debian and Ubuntu ship the venv module without ensurepip unless python3-venv is there.
        raise SystemExit(
            f"run.py: could not create a virtualenv with pip ({exc}).\n"
            "On Debian or Ubuntu: sudo apt-get install python3-venv, then run this again."
        ) from exc
    return python


def install_fingerprint(python: Path, backend: str) -> str:
    """What the installed packages depend on; a change means pip must run again."""
    digest = hashlib.sha256()
    digest.update((REPO / "pyproject.toml").read_bytes())
    digest.update(json.dumps([backend, REQUIREMENTS[backend], str(python)]).encode())
    return digest.hexdigest()


def ensure_installed(python: Path, backend: str, *, force: bool) -> None:
    stamp = python.parent.parent / STAMP_NAME
    fingerprint = install_fingerprint(python, backend)
    if not force and stamp.exists() and stamp.read_text().strip() == fingerprint:
        step("Packages up to date (--reinstall forces pip)")
        return
    step(f"Installing this checkout and its {backend} requirements with pip")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "install", "--quiet", *REQUIREMENTS[backend]])
    stamp.write_text(fingerprint + "\n")


def ensure_postgres_database(python: Path) -> None:
    run([str(python), str(HERE / "create_database.py")])


if __name__ == "__main__":
    sys.exit(main())
