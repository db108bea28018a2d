"""Child processes of a test run, read from /proc (Linux, where CI runs): what the end-of-session
check in conftest.py and the Megatron writer test look for."""

from __future__ import annotations

import subprocess
from pathlib import Path

# multiprocessing's resource tracker lives exactly as long as the process that started it.
HARMLESS = ("multiprocessing.resource_tracker",)


def _stat(pid: str) -> tuple[int, str] | None:
    """(parent pid, state) of a process, or None when it is gone."""
    try:
        after_name = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(after_name[1]), after_name[0]


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def live_descendants(pid: int) -> list[int]:
    """Every running (not zombie) descendant of ``pid``; empty where there is no /proc."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit() and (st := _stat(entry.name)) is not None and st[1] != "Z":
            children.setdefault(st[0], []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return sorted(out)


def leftover(pid: int) -> list[tuple[int, str]]:
    """Descendants of ``pid`` that a test left running, with their command lines."""
    found = [(c, command_line(c)) for c in live_descendants(pid)]
    return [(c, cmd) for c, cmd in found if not any(h in cmd for h in HARMLESS)]


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, up to ``grace_s`` seconds for a clean exit, then SIGKILL: a test's child never outlives it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
