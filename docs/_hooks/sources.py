"""MkDocs hooks that keep the site tied to the package it documents.

* ``changelog.md`` is generated from the repository's ``CHANGELOG.md``, so there is one changelog
  to maintain and the site can never show a stale copy.
* The build fails when a setting of ``django_idempotency.conf``, a problem code of
  ``django_idempotency.exceptions`` or a system check ID of ``django_idempotency.checks`` has no
  entry in the reference pages: a new public name cannot ship undocumented.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


def on_files(files: Files, config: Any) -> Files:
    changelog = ROOT / "CHANGELOG.md"
    files.append(File.generated(config, "changelog.md", abs_src_path=str(changelog)))
    return files


def _public_names() -> tuple[list[str], list[str], list[str]]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from django_idempotency.checks import CHECK_IDS
    from django_idempotency.conf import Settings
    from django_idempotency.exceptions import PROBLEMS

    settings = [name for name in vars(Settings) if name.startswith("IDEMPOTENCY_")]
    codes = [problem.code for problem in PROBLEMS]
    checks = [f"django_idempotency.{check_id}" for check_id in CHECK_IDS]
    return settings, codes, checks


def on_pre_build(config: Any) -> None:
    docs = Path(config["docs_dir"])
    settings_page = (docs / "settings.md").read_text(encoding="utf-8")
    problems_page = (docs / "problems.md").read_text(encoding="utf-8")
    settings, codes, checks = _public_names()
    missing = [f"settings.md: {name}" for name in settings if f"### `{name}:" not in settings_page]
    missing += [f"settings.md: {check}" for check in checks if f"`{check}`" not in settings_page]
    missing += [f"problems.md: {code}" for code in codes if f"{{#{code}}}" not in problems_page]
    if missing:
        raise PluginError("Undocumented public names:\n  " + "\n  ".join(missing))
