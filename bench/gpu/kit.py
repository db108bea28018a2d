"""The kit's second half: every GPU check as a part with its own time budget, one after another,
going on when one fails, then one summary. Standard library only (it starts before the carried
wheels are installed).

    python3 bench/gpu/kit.py --out "$OUT"                  # on the GPU machine (scripts/gpu_check.sh run)
    .venv/bin/python bench/gpu/kit.py --cpu --out runs/gpu_rehearsal   # the rehearsal, tiny sizes

Writes to ``--out``: ``summary.md`` (the table), ``results.json`` (each part: status, seconds,
budget, its own JSON), ``logs.tar.gz`` (every part's log). Each part runs in its own process
group and is killed at its budget; the whole run stops starting parts at ``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from parts import PARTS, Part, command  # this folder is sys.path[0] when run as a script
from report import failed, headline, junit_counts, summary_table

ROOT = Path(__file__).resolve().parents[2]
RESERVE_S = 15  # kept back from the deadline for the summary and the log archive


def run_part(part: Part, mode: str, subs: dict[str, str], budget: int, work: Path, env: dict) -> dict:
    """Run one part under its budget (its whole process group is killed at the end of it)."""
    argv = command(part, mode, subs)
    log = work / "logs" / f"{part.name}.log"
    if "{wheels}" in part.argv[mode] and not any(a.endswith(".whl") for a in argv):
        return {"name": part.name, "what": part.what, "status": "skipped (no wheels)", "seconds": 0, "budget": budget}
    t0 = time.monotonic()
    with open(log, "wb") as f:
        f.write(("$ " + " ".join(argv) + "\n").encode())
        f.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(budget)
            status = "pass" if rc == 0 else f"fail (rc {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    out: dict = {"name": part.name, "what": part.what, "status": status, "rc": rc, "budget": budget}
    out["seconds"] = time.monotonic() - t0
    data = None
    try:
        if part.name == "pytest_gpu":
            data = junit_counts((work / "pytest_gpu.xml").read_text())
            if rc == 0 and data["passed"] == 0:  # expected in the rehearsal; on a GPU, nothing was proven
                out["status"] = "pass (all skipped)" if mode == "cpu" else "fail (none passed)"
        elif part.result:
            data = json.loads((work / part.result).read_text())
        out["data"] = data
        out["headline"] = headline(part.name, data)
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as e:
        out["error"] = f"no result: {type(e).__name__}: {e}"[:300]
    if rc != 0:
        tail = log.read_bytes()[-600:].decode(errors="replace").strip().splitlines()
        out["log_tail"] = tail[-1] if tail else ""
        out.setdefault("error", out["log_tail"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the CPU rehearsal: tiny sizes, expects everything on the CPU")
    ap.add_argument("--out", required=True, help="summary.md, results.json and logs.tar.gz go here")
    ap.add_argument("--work", help="scratch folder: models, installed wheels, runs (default: a temporary one, removed)")
    ap.add_argument("--carry", default=str(ROOT / ".gpu"), help="what prepare wrote (wheels/, smollm2/)")
    ap.add_argument("--only", help="comma-separated part names (wheels, env and models always run first)")
    ap.add_argument("--deadline", type=float, help="seconds; no part starts or runs past it (default 540, --cpu 1800)")
    ap.add_argument("--dry-run", action="store_true", help="print each part's budget and command, run nothing")
    ap.add_argument("--budget", action="append", default=[], metavar="PART=S", help="change one part's budget")
    args = ap.parse_args()
    t_start = time.monotonic()
    mode = "cpu" if args.cpu else "gpu"
    deadline = args.deadline or (1800 if args.cpu else 540)
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else None
    carry = Path(args.carry).resolve()
    if not (carry / "wheels").is_dir() or not (carry / "smollm2" / "tokenizer.json").is_file():
        print(f"error: --carry {carry} lacks wheels/ or smollm2/: run `bash scripts/gpu_check.sh prepare` first")
        return 2
    names = [p.name for p in PARTS]
    only = set(args.only.split(",")) if args.only else set(names)
    if unknown := only - set(names):
        print(f"error: --only names unknown parts {sorted(unknown)}; the parts are {names}")
        return 2
    budgets = {}
    for b in args.budget:
        name, _, s = b.partition("=")
        if name not in names or not s.isdigit():
            print(f"error: --budget {b!r}: give PART=SECONDS with PART one of {names}")
            return 2
        budgets[name] = int(s)
    subs = {"work": str(work or "WORK"), "wheels": str(carry / "wheels"), "template": str(carry / "smollm2")}
    if args.dry_run:
        for part in PARTS:
            if part.name in only or part.name in ("wheels", "env", "models"):
                budget = budgets.get(part.name, part.budget[mode == "cpu"])
                print(f"{part.name} ({budget} s): {' '.join(command(part, mode, subs))}")
        return 0
    work = work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    subs["work"] = str(work)
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "POP_NEMO_CACHE": str(work / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(work / "site"), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    invocation = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    print(f"gpu_check {mode}: {platform.node()}, python {platform.python_version()}; out {out}", flush=True)
    results = []
    for part in PARTS:
        if part.name not in only and part.name not in ("wheels", "env", "models"):
            continue
        budget = budgets.get(part.name, part.budget[mode == "cpu"])
        left = int(deadline - (time.monotonic() - t_start) - RESERVE_S)
        if left < 10:
            results.append(
                {"name": part.name, "what": part.what, "status": "skipped (deadline)", "seconds": 0, "budget": budget}
            )
            continue
        r = run_part(part, mode, subs, min(budget, left), work, env)
        results.append(r)
        print(
            f"{r['name']:>16}: {r['status']} in {r['seconds']:.0f} s  {r.get('headline') or r.get('error', '')}",
            flush=True,
        )
        (out / "results.json").write_text(json.dumps({"mode": mode, "command": invocation, "parts": results}, indent=1))
    table = summary_table(mode, results, invocation)
    (out / "summary.md").write_text(table)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")
        for f in sorted(work.glob("*.json")) + sorted(work.glob("*.xml")) + sorted(work.glob("server_*.log")):
            tar.add(f, arcname=f"results/{f.name}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table)
    return 1 if any(failed(r["status"]) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
