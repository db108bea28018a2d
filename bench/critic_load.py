"""Load test of the critic server: dynamic batching against ``max_batch=1``, in one run.

Starts `pop-nemo serve-critic` twice on loopback (same config, same model; once with
``serve.max_batch=B``, once with ``serve.max_batch=1``) and, for each, drives it with 1, 8 and
64 concurrent clients. Each client sends one-item ``POST /v1/score`` requests back to back (a
closed loop) with real judge prompts; it reports items/s and the p50/p99 request latency, and
the ratio batched / unbatched per client count.

    python bench/critic_load.py                       # tests/conf/tiny.yaml, SmolLM2, CPU
    python bench/critic_load.py --config conf/critic_cpu.yaml --items 256 --json out.json

Loopback only; every loop is bounded by --items per level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

PROBLEM = "Which vitamin does the skin make when it is exposed to sunlight, and why does it matter?"
RUBRIC = [
    {"name": "Correct vitamin", "gold": "Vitamin D", "description": "Names vitamin D", "weight": 3},
    {"name": "Why it matters", "gold": "Calcium uptake", "description": "Says it helps absorb calcium", "weight": 1},
]
ANSWERS = [
    "Vitamin D. UVB light on the skin starts its synthesis; it helps the gut absorb calcium for bones.",
    "The skin makes vitamin D in sunlight. It matters for strong bones.",
    "Vitamin C, which helps the immune system.",
    "Sunlight lets the skin make vitamin D, needed to take up calcium and phosphate from food.",
    "Iron. It carries oxygen in the blood.",
    "It makes melanin, which protects the skin from burning.",
    "Vitamin D3 (cholecalciferol); without it bones soften (rickets in children).",
    "I am not sure, maybe vitamin A for the eyes.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: str, max_batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pop_nemo.cli", "serve-critic", "--config", config, "--port", str(port)]
    cmd += [
        f"serve.max_batch={max_batch}",
        f"serve.max_wait_ms={args.max_wait_ms}",
        "serve.max_queue=4096",
        f"serve.device={args.device}",
    ]
    if args.num_threads:
        cmd.append(f"serve.num_threads={args.num_threads}")
    cmd += args.override
    log = open(Path(args.log_dir) / f"server_b{max_batch}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + args.startup_timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server at {url} not ready after {args.startup_timeout} s")


def body(k: int) -> dict:
    return {"items": [{"id": f"b{k}", "problem": PROBLEM, "rubric": RUBRIC, "answer": ANSWERS[k % len(ANSWERS)]}]}


async def drive(url: str, clients: int, total: int) -> dict:
    """``clients`` closed-loop clients share ``total`` one-item requests."""
    latencies: list[float] = []
    invalid = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=3600) as client:

        async def worker():
            nonlocal invalid
            for k in counter:
                t = time.perf_counter()
                r = await client.post("/v1/score", json=body(k))
                latencies.append(time.perf_counter() - t)
                r.raise_for_status()
                invalid += sum(not o["valid"] for o in r.json()["items"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "clients": clients,
        "items": total,
        "seconds": wall,
        "items_per_s": total / wall,
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
        "invalid": invalid,
    }


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    got = {}
    for line in text.splitlines():
        for key in ("pop_critic_batch_size_sum", "pop_critic_batch_size_count"):
            if line.startswith(key + '{kind="judge"}'):
                got[key] = float(line.rsplit(" ", 1)[1])
    return got.get("pop_critic_batch_size_sum", 0.0), got.get("pop_critic_batch_size_count", 0.0)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{cpu}, {os.cpu_count()} cores visible"
    try:
        load = os.getloadavg()[0]
        out += f", load average {load:.1f} at start"
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            out += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "tests" / "conf" / "tiny.yaml"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--items", type=int, default=128, help="one-item requests per client count (at least 2 per client)")
    p.add_argument("--min-per-client", type=int, default=2, help="a level sends at least this many requests per client")
    p.add_argument("--max-batch", type=int, default=64, help="serve.max_batch of the batched server")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num-threads", type=int, default=None, help="serve.num_threads (torch CPU threads)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--log-dir", default=".")
    p.add_argument("--json", help="write the results here")
    p.add_argument("override", nargs="*", help="extra config overrides for both servers")
    args = p.parse_args()

    results: dict = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "runs": {}}
    print(f"machine: {results['machine']}", flush=True)
    # Both servers are up for the whole run and each client count is measured on one, then at once
    # on the other, so a change in the machine's other load affects both sides of a ratio alike.
    modes = (("batched", args.max_batch), ("max_batch=1", 1))
    servers = {}
    try:
        for label, max_batch in modes:
            servers[label] = start_server(args.config, max_batch, args)
            asyncio.run(drive(servers[label][1], min(args.warmup, 4), args.warmup))  # grammar compile, caches
        for c in args.clients:
            for label, _ in modes:
                url = servers[label][1]
                before = batch_stats(url)
                row = asyncio.run(drive(url, c, max(args.items, args.min_per_client * c)))
                after = batch_stats(url)
                calls = after[1] - before[1]
                row["mean_batch"] = (after[0] - before[0]) / calls if calls else None
                results["runs"].setdefault(label, []).append(row)
                print(
                    f"{label:>12} clients={c:>3} items/s={row['items_per_s']:.3f} p50={row['p50_s']:.2f}s "
                    f"p99={row['p99_s']:.2f}s mean_batch={row['mean_batch']:.1f} invalid={row['invalid']}",
                    flush=True,
                )
                if args.json:  # after every level, so a run cut short keeps the levels it finished
                    Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)

    print(
        "\n| clients | batched items/s | max_batch=1 items/s | ratio | batched p50 / p99 (s) | max_batch=1 p50 / p99 (s) | mean batch |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b, u in zip(results["runs"]["batched"], results["runs"]["max_batch=1"]):
        ratio = b["items_per_s"] / u["items_per_s"]
        b["ratio"] = ratio
        print(
            f"| {b['clients']} | {b['items_per_s']:.3f} | {u['items_per_s']:.3f} | {ratio:.2f}x | "
            f"{b['p50_s']:.2f} / {b['p99_s']:.2f} | {u['p50_s']:.2f} / {u['p99_s']:.2f} | {b['mean_batch']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
