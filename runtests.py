#!/usr/bin/env python3
"""Run the test suite over the backend matrix. Needs nothing but Python 3.

    python3 runtests.py                  # sqlite, postgres, mariadb, redis, redis-store, example
    python3 runtests.py --backend sqlite     # one backend (repeatable)
    python3 runtests.py -- -k replay -x      # extra pytest arguments after --

The first run creates ``.venv`` and installs the project with its test extras; later runs reuse
it and reinstall only when pyproject.toml changed. A backend whose server is not answering has
its tests skipped with the reason printed, unless IDEMPOTENCY_TEST_REQUIRE_SERVICES=1, which
makes a missing server fail the run (``.ci/run`` sets it). Coverage is combined over the backends
that ran; the 95 % floor in pyproject.toml applies when the whole matrix ran. Modules that touch
no database or store (``STORE_INDEPENDENT`` in tests/backends.py) run on SQLite only, unless
pytest arguments are given, which run on every selected backend as asked.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

from tests.backends import BACKENDS

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("IDEMPOTENCY_VENV", ROOT / ".venv"))
EXTRAS = os.environ.get("IDEMPOTENCY_EXTRAS", "test")


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> None:
    """Create and fill the virtualenv, then re-run this script inside it."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = venv_python()
    if not python.exists():
        print(f"runtests: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".django-idempotency-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + EXTRAS.encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        print(f"runtests: installing the project with extras [{EXTRAS}]", flush=True)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-e", f"{ROOT}[{EXTRAS}]"], check=True, cwd=ROOT)
        stamp.write_text(wanted)
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=sorted(BACKENDS))
    parser.add_argument("--no-coverage", action="store_true")
    parser.add_argument(
        "--install-only", action="store_true", help="create and fill the virtualenv, run nothing"
    )
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    ensure_venv()
    if args.install_only:
        print(f"runtests: {sys.prefix} is ready")
        return 0

    required = os.environ.get("IDEMPOTENCY_TEST_REQUIRE_SERVICES") == "1"
    selected = args.backend or list(BACKENDS)
    python = sys.executable
    for old in ROOT.glob(".coverage*"):
        old.unlink()
    results: dict[str, str] = {}
    complete = selected == list(BACKENDS)
    for name in selected:
        backend = BACKENDS[name]
        down = backend.missing()
        if down:
            complete = False
            verdict = "FAILED" if required else "skipped"
            print(f"\nruntests: {name}: nothing answers ({', '.join(down)}); tests {verdict}")
        env = {**os.environ, **backend.env, "PYTHONPATH": str(ROOT)}
        runner = [python, "-m", "pytest"]
        if not args.no_coverage:
            runner = [python, "-m", "coverage", "run", "-m", "pytest"]
        print(f"\n===== backend {name} =====", flush=True)
        own = backend.pytest_args(whole_suite=not args.pytest_args)
        command = [*runner, *own, *args.pytest_args]
        began = time.monotonic()
        code = subprocess.run(command, cwd=ROOT, env=env).returncode
        took = f"in {time.monotonic() - began:.0f} s"
        if code != 0:
            results[name] = f"FAILED (exit {code}) {took}"
        elif down:
            results[name] = f"skipped: nothing answers ({', '.join(down)})"
        else:
            results[name] = f"passed {took}"

    failed = any(r.startswith("FAILED") for r in results.values())
    if not args.no_coverage:
        subprocess.run([python, "-m", "coverage", "combine", "-q"], cwd=ROOT, check=False)
        report = [python, "-m", "coverage", "report"]
        if not complete or args.pytest_args:
            print("\nruntests: part of the matrix ran, so the coverage floor is not enforced")
            report.append("--fail-under=0")
        if subprocess.run(report, cwd=ROOT).returncode != 0:
            results["coverage"] = "FAILED (below the floor in pyproject.toml)"
            failed = True
    print("\nruntests summary:")
    for name, result in results.items():
        print(f"  {name:18} {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
