"""Write a copy of a wheel with one file left out, for the CI step that proves tox tests the wheel.

    python .ci/tamper_wheel.py WHEEL OUT_DIR MEMBER

The copy keeps the wheel's file name and drops MEMBER from ``RECORD`` too, so pip installs it
without complaint: the only defect is the missing file, as when a package-data rule goes wrong.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def main(wheel: Path, out_dir: Path, member: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    with (
        zipfile.ZipFile(wheel) as source,
        zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        names = source.namelist()
        if member not in names:
            raise SystemExit(f"{wheel.name} has no {member}: nothing to tamper with")
        for info in source.infolist():
            if info.filename == member:
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(f"{member},")).encode()
            out.writestr(info, data)
    print(f"tamper_wheel: {target} lacks {member}")
    return target


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
