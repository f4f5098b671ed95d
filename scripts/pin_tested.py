"""Write constraints.txt: the exact versions of fourbit's dependencies, test extras included,
as installed in this environment, after the suite passed here.

    bash scripts/install.sh newest && python -m pytest -q && python scripts/pin_tested.py

It walks the requirement tree of ``fourbit[test]`` through the installed packages' metadata
(what pip resolved), so the file pins the whole tree, not only the names in pyproject.toml.
torch, triton and NVIDIA's CUDA packages are left out: scripts/install.sh chooses torch by the
machine (the CPU build here, the machine's own CUDA build on a GPU); they and what only they
need come with it.
"""

from __future__ import annotations

import datetime
import importlib.metadata as md
import platform
import re
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tree(root: str, extras: set[str]) -> dict[str, str]:
    """name -> installed version, for every package ``root[extras]`` needs here."""
    found: dict[str, str] = {}
    todo = [(root, frozenset(extras))]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        if LEFT_OUT.match(name):  # nor what only they need
            continue
        dist = md.distribution(name)
        found[canonical(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            environment = default_environment()
            if req.marker and not any(req.marker.evaluate(environment | {"extra": e}) for e in (wanted or {""})):
                continue
            todo.append((canonical(req.name), frozenset(req.extras)))
    return found


def main() -> None:
    pins = {n: v for n, v in tree("fourbit", {"test"}).items() if n != "fourbit"}
    header = [
        "# The versions the whole test suite last passed with (scripts/pin_tested.py wrote this file;",
        "# scripts/install.sh installs with it). torch is chosen by scripts/install.sh, not here.",
        f"# {datetime.date.today()}, Python {platform.python_version()}, torch {md.version('torch')}, {sys.platform}",
    ]
    text = "\n".join(header + [f"{n}=={v}" for n, v in sorted(pins.items())]) + "\n"
    target = ROOT / "constraints.txt"
    staging = target.with_suffix(".txt.tmp")
    staging.write_text(text)
    staging.replace(target)
    print(f"wrote {len(pins)} pins to {target}")


if __name__ == "__main__":
    main()
