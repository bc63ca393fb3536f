#!/usr/bin/env python3
"""Django's command-line utility for the example project.

Run it from anywhere as ``python example_project/manage.py <command>``. Python puts this script's
folder first on ``sys.path``; the repository root goes there instead, so that the project is
always imported as ``example_project.*`` (the name the test suite uses too) and the checkout's
``django_idempotency`` is the one under test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
