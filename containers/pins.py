"""Read containers/image-pins.txt: the image's package set, written once for the Dockerfile and the
CPU test environment (.venv-image), so the two cannot drift.

Standard library only (it runs in the base image before anything is installed):

    python containers/pins.py list [--role image|added] [--deps|--no-deps] [--cpu]
    python containers/pins.py check [--role image] [--cpu]   # installed versions satisfy the pins
    python containers/pins.py table                          # docs/CLUSTER.md's version table
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PINS = Path(__file__).resolve().with_name("image-pins.txt")
ROLES = ("image", "added")
FLAGS = ("no-deps", "gpu-only")
_LINE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<spec>[^#]*?)\s+#\s*(?P<tags>[^:]+?)\s*(?::\s*(?P<note>.*))?$"
)


@dataclass(frozen=True)
class Pin:
    name: str
    spec: str  # a pip specifier, e.g. "==2.9.0" or ">=0.120.1,<=0.121.3"
    role: str
    flags: frozenset[str]
    note: str

    @property
    def requirement(self) -> str:
        return self.name + self.spec


def parse(text: str) -> list[Pin]:
    """Pins in file order; a line that breaks the format raises ValueError naming it."""
    pins = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"image-pins.txt:{n}: {line!r} is not `name<specifier>  # role[, flag]: note`")
        tags = [t.strip() for t in m["tags"].split(",")]
        role, flags = tags[0], frozenset(tags[1:])
        if role not in ROLES or not flags <= set(FLAGS):
            raise ValueError(f"image-pins.txt:{n}: tags {tags} must be one of {ROLES} then flags from {FLAGS}")
        spec = m["spec"].replace(" ", "")
        if not spec:
            raise ValueError(f"image-pins.txt:{n}: {m['name']} has no version specifier")
        pins.append(Pin(m["name"].lower(), spec, role, flags, (m["note"] or "").strip()))
    return pins


def load(path: Path = PINS) -> list[Pin]:
    return parse(path.read_text())


def select(pins: list[Pin], role: str | None = None, no_deps: bool | None = None, cpu: bool = False) -> list[Pin]:
    return [
        p
        for p in pins
        if (role is None or p.role == role)
        and (no_deps is None or ("no-deps" in p.flags) == no_deps)
        and not (cpu and "gpu-only" in p.flags)
    ]


def _specifier(spec: str):
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # the image's pip vendors packaging
        from pip._vendor.packaging.specifiers import SpecifierSet
    return SpecifierSet(spec)


def mismatches(pins: list[Pin]) -> list[str]:
    """One line per pin the current environment does not satisfy."""
    bad = []
    for p in pins:
        try:
            have = metadata.version(p.name)
        except metadata.PackageNotFoundError:
            bad.append(f"{p.name}: not installed (pinned {p.spec})")
            continue
        if not _specifier(p.spec).contains(have, prereleases=True):
            bad.append(f"{p.name}: {have} installed, pinned {p.spec}")
    return bad


def table(pins: list[Pin]) -> str:
    """The markdown version table docs/CLUSTER.md carries (checked by tests/test_image_pins.py)."""
    rows = ["| package | version | where it comes from |", "|---|---|---|"]
    for p in pins:
        where = "the base image" if p.role == "image" else "added by the Dockerfile"
        extra = [f for f in sorted(p.flags)] + ([p.note] if p.note else [])
        rows.append(f"| {p.name} | `{p.spec}` | {where}{'; ' + '; '.join(extra) if extra else ''} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["list", "check", "table"])
    ap.add_argument("--role", choices=ROLES)
    deps = ap.add_mutually_exclusive_group()
    deps.add_argument("--no-deps", dest="no_deps", action="store_const", const=True)
    deps.add_argument("--deps", dest="no_deps", action="store_const", const=False)
    ap.add_argument("--cpu", action="store_true", help="leave out gpu-only pins")
    args = ap.parse_args(argv)
    pins = select(load(), args.role, args.no_deps, args.cpu)
    if args.command == "list":
        print("\n".join(p.requirement for p in pins))
    elif args.command == "table":
        print(table(pins))
    else:
        bad = mismatches(pins)
        for line in bad:
            print(f"image-pins: {line}", file=sys.stderr)
        if bad:
            return 1
        print(f"image-pins: {len(pins)} pins satisfied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
