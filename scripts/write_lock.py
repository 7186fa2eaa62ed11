"""Writes requirements/lock.txt (a pip constraints file) from the packages installed in a venv.

    python scripts/write_lock.py VENV_PYTHON OUT

Every installed distribution is pinned with ``==``, except the project itself (installed editable). Local
version labels are dropped (``torch==2.13.0+cpu`` -> ``torch==2.13.0``): which build of torch is installed is
chosen by ``scripts/setup.sh`` (``TORCH_SPEC``), the lock only fixes the release.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

HEADER = """\
# Pinned versions of every package the project and its dev extra install, used as pip constraints by
# scripts/setup.sh (and so by CI): pip install -c requirements/lock.txt -e ".[dev]".
# pyproject.toml keeps version ranges for people who install the package into their own environments.
# Refresh: bash scripts/latest.sh --write-lock   (newest releases, full test suite, then this file if green)
# Written {day} by scripts/write_lock.py with {python}.
"""


def freeze(python: str) -> list[str]:
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    pins = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue  # editable / direct-URL installs are not pinned
        name, version = line.split("==", 1)
        if name.lower().replace("_", "-") == "sparsify-encoders":
            continue
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    return sorted(pins, key=str.lower)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    python, out = argv
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    text = HEADER.format(day=date.today().isoformat(), python=f"Python {version}") + "\n".join(freeze(python)) + "\n"
    Path(out).write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
