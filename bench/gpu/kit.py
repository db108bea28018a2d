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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESERVE_S = 15  # kept back from the deadline for the summary and the log archive


@dataclass
class Part:
    name: str
    what: str  # one line for the summary
    budget: tuple[int, int]  # seconds: (GPU, CPU rehearsal)
    argv: dict[str, list[str]]  # per mode ('gpu', 'cpu'); {work}, {wheels}, {template} are filled in
    result: str | None = None  # the JSON file it writes, relative to the work folder


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


# conf/offline/tiny_cpu.yaml's lengths and grammar bounds (every guided output fits): random weights
# write until the limit, and the Megatron path's engines may generate on the CPU.
SHORT = (
    "rollout.proposer.max_new_tokens=120 rollout.solver.max_new_tokens=32 rollout.rubric.max_new_tokens=150 "
    "rollout.judge.max_new_tokens=100 rollout.guide.problem_chars=50 rollout.guide.reference_chars=30 "
    "rollout.guide.name_chars=16 rollout.guide.gold_chars=16 rollout.guide.description_chars=30 "
    "rollout.guide.thoughts_chars=16 rollout.guide.max_criteria=1 corpus.max_words=60"
).split()


def _online(backend: str, gpu_overrides: list[str]) -> dict[str, list[str]]:
    base = ["bench/gpu/online.py", "--backend", backend, "--out", f"{{work}}/online_{backend}"]
    base += ["--json", f"{{work}}/online_{backend}.json"]
    return {
        "gpu": _py(*base, "--expect", "cuda", *SHORT, *gpu_overrides),
        "cpu": _py(*base, "--expect", "cpu", *SHORT),
    }


def _train_step(preset: str) -> dict[str, list[str]]:
    out = ["--out", f"{{work}}/train_step_{preset}.json"]
    gpu = ["--preset", preset, "--bf16", "--batch", "8", "--seq", "1024", "--micro-batch", "4", "--steps", "3"]
    cpu = ["--preset", "small", "--batch", "2", "--seq", "32", "--micro-batch", "2", "--steps", "1", "--threads", "1"]
    return {
        "gpu": _py("bench/train_step.py", *gpu, "--warmup", "1", *out),
        "cpu": _py("bench/train_step.py", *cpu, *out),
    }


PYTEST = ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", "{work}/pytest_gpu.xml"]
ENV = (
    "import json, torch, transformers, importlib.metadata as md\n"
    "v = {n: md.version(n) for n in ('torch', 'transformers', 'accelerate', 'megatron-core', 'megatron-bridge', "
    "'xgrammar', 'pydantic')}\n"
    "v['cuda'] = torch.version.cuda\n"
    "v['device'] = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'\n"
    "v['python'] = __import__('sys').version.split()[0]\n"
    "json.dump(v, open('{work}/env.json', 'w')); print(json.dumps(v))\n"
)
CRITIC = ["bench/critic_load.py", "--config", "tests/conf/tiny.yaml", "--json", "{work}/critic_load.json"]
CRITIC += ["--log-dir", "{work}", "--min-per-client", "1"]
SYNTH = ["bench/synthesis.py", "--config", "conf/offline/tiny_cpu.yaml", "--json", "{work}/synthesis.json"]
PIPE = "bench/pipeline.py --config tests/conf/tiny.yaml --docs 2 --n 2 --json {work}/pipeline.json".split()

PARTS = [
    Part(
        "wheels",
        "the carried wheels installed into a target folder (--no-deps, no index)",
        (90, 120),
        {m: _py("-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", "{work}/site", "{wheels}") for m in ("gpu", "cpu")},
    ),
    Part("env", "versions it ran with", (60, 60), {m: _py("-c", ENV) for m in ("gpu", "cpu")}, "env.json"),
    Part(
        "models",
        "random-weight SmolLM2 (real shape on GPU, tiny on CPU) with the real tokenizer",
        (60, 60),
        {
            m: _py("bench/gpu/models.py", "--template", "{template}", "--shape", s, "--cache", "{work}/cache")
            for m, s in (("gpu", "smollm2-135m"), ("cpu", "tiny"))
        },
    ),
    Part("pytest_gpu", "pytest -m gpu (all of them)", (120, 180), {m: _py(*PYTEST) for m in ("gpu", "cpu")}),
    Part(
        "online_hf",
        "2 online steps, HF policy + HF engines; devices and outputs contract",
        (60, 120),
        _online("hf", ["model.dtype=bfloat16"]),
        "online_hf.json",
    ),
    Part(
        "online_megatron",
        "2 online steps, policy.backend=megatron (TP=1, 1 rank, no TE); devices and contract",
        (80, 180),
        _online("megatron", ["model.dtype=bfloat16", "megatron.bf16=true"]),
        "online_megatron.json",
    ),
    Part(
        "pipeline",
        "self-play stage vs raw engine",
        (45, 120),
        {
            "gpu": _py(*PIPE, "--repeats", "2", "--device", "cuda", "--threads", "8", "model.dtype=bfloat16"),
            "cpu": _py(*PIPE, "--repeats", "1", "--threads", "1"),
        },
        "pipeline.json",
    ),
    Part(
        "critic_load",
        "critic server, batched vs max_batch=1, 1/8/64 clients",
        (100, 150),
        {
            "gpu": _py(*CRITIC, "--device", "cuda", "--clients", "1", "8", "64", "--items", "8", "model.dtype=bfloat16"),
            "cpu": _py(*CRITIC, "--device", "cpu", "--clients", "1", "2", "--items", "2", "--num-threads", "1"),
        },
        "critic_load.json",
    ),
    Part(
        "synthesis",
        "offline synthesis, batched vs sequential",
        (120, 150),
        {
            "gpu": _py(*SYNTH, "--docs", "16", "--n", "8", "--max-batch", "64", "--threads", "8", "model.dtype=bfloat16"),
            "cpu": _py(*SYNTH, "--docs", "2", "--n", "2", "--max-batch", "4", "--threads", "1"),
        },
        "synthesis.json",
    ),
    Part("train_step_0.5b", "train step Megatron vs HF, Qwen2.5-0.5B shape", (60, 90), _train_step("qwen2-0.5b"), "train_step_qwen2-0.5b.json"),
    Part("train_step_1.5b", "train step Megatron vs HF, Qwen2.5-1.5B shape", (120, 90), _train_step("qwen2-1.5b"), "train_step_qwen2-1.5b.json"),
]  # fmt: skip


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def junit_counts(xml_text: str) -> dict[str, int]:
    """tests, failures (incl. errors) and skipped of a pytest --junitxml report."""
    root = ET.fromstring(xml_text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {
        "tests": n["tests"],
        "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
        "failed": n["failures"] + n["errors"],
        "skipped": n["skipped"],
    }


def headline(name: str, data: dict | None) -> str:
    """The summary's result cell for a part's own JSON (empty when it wrote none)."""
    if not data:
        return ""
    if name == "env":
        return ", ".join(f"{k} {v}" for k, v in data.items())
    if name == "pytest_gpu":
        return f"{data['passed']} passed, {data['failed']} failed, {data['skipped']} skipped"
    if name.startswith("online_"):
        dev = ", ".join(f"{k} {'+'.join(v) or '—'}" for k, v in data.get("devices", {}).items())
        steps = "; ".join(f"step {m['step']} {_fmt(m.get('time_step'), '.1f')} s" for m in data.get("metrics", []))
        probs = "; ".join(data.get("problems", [])) or "contract holds"
        return f"{dev}. {steps}. {probs}"
    if name == "critic_load":
        b, u = data.get("runs", {}).get("batched", []), data.get("runs", {}).get("max_batch=1", [])
        cells = [
            f"{x['clients']} clients {x['items_per_s'] / y['items_per_s']:.2f}× ({x['items_per_s']:.2f} vs {y['items_per_s']:.2f} items/s)"
            for x, y in zip(b, u)
        ]
        return "; ".join(cells) or "no level finished"
    if name == "synthesis":
        return (
            f"{_fmt(data.get('ratio_examples_per_s'))}× ({data.get('docs')} docs, N={data.get('n')}, "
            f"{data.get('max_batch')} rows/forward; sequential {_fmt(data['sequential']['seconds'], '.1f')} s, "
            f"batched {_fmt(data['batched']['seconds'], '.1f')} s)"
        )
    if name == "pipeline":
        return f"stage/raw {_fmt(data.get('ratio'))} ({_fmt(data.get('stage_tok_s'), '.1f')} vs {_fmt(data.get('raw_tok_s'), '.1f')} tok/s)"
    if name.startswith("train_step"):
        m, h = data.get("megatron", {}), data.get("hf", {})
        mfu = f", MFU {_fmt(m.get('mfu_vs_bf16_dense_peak'), '.1%')} / {_fmt(h.get('mfu_vs_bf16_dense_peak'), '.1%')}"
        return (
            f"{data.get('preset')}: Megatron {_fmt(m.get('tokens_per_s'), '.0f')} vs HF {_fmt(h.get('tokens_per_s'), '.0f')} tok/s, "
            f"ratio {_fmt(data.get('megatron_over_hf_tokens_per_s'))}{mfu if 'mfu_vs_bf16_dense_peak' in m else ''}"
        )
    return json.dumps(data)[:200]


def summary_table(mode: str, results: list[dict], command: str) -> str:
    """The markdown summary: one row per part, in run order."""
    lines = [
        f"# GPU acceptance kit: {mode} run",
        "",
        f"Command: `{command}`",
        "",
        "| part | status | seconds / budget | result | what |",
        "|---|---|---:|---|---|",
    ]
    for r in results:
        cell = r.get("headline") or r.get("error", "")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} / {r['budget']} | {cell} | {r['what']} |")
    passed = sum(r["status"].startswith("pass") for r in results)
    lines += ["", f"{passed} of {len(results)} parts passed."]
    return "\n".join(lines) + "\n"


def command(part: Part, mode: str, subs: dict[str, str]) -> list[str]:
    """The part's argv with the placeholders filled in ({wheels}: every carried wheel)."""
    argv = []
    for a in part.argv[mode]:
        if a == "{wheels}":
            argv += sorted(str(p) for p in Path(subs["wheels"]).glob("*.whl"))
        else:
            for k, v in subs.items():
                a = a.replace("{" + k + "}", v)
            argv.append(a)
    return argv


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


def failed(status: str) -> bool:
    """A part that failed, ran out of its budget, or never ran for lack of time."""
    return status.startswith(("fail", "timeout", "skipped (deadline)"))


if __name__ == "__main__":
    sys.exit(main())
