"""Does the online loop raise the reward it is given? A CPU learning curve, with a control.

    python bench/learning.py --out runs/learning            # both runs, then the plot
    python bench/learning.py --out runs/learning --plot-only

Two ``pop-nemo train`` runs of ``conf/learning_cpu.yaml`` (SmolLM2-135M, ``algo.answer_fallback:
false``) on the same seed: ``trained`` at the config's learning rate and ``control`` at
``policy.lr=0``. Both see the same documents and request seeds, so any gap between them comes from
the updates (refit of the rollout engine included). The reward the 135M judge cannot fake is the
share of solver replies with an ``<answer>`` block (``solver_format_valid_rate``). The script reads
each run's ``metrics.jsonl`` and writes ``learning.png`` and ``learning.json`` (per-run means over
the first and last thirds of the steps, steps that reached an update, and wall time) into ``--out``. Runs resume when rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pop_nemo.jsonl import read_rows

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("solver_format_valid_rate", "reward_mean", "num_train_samples", "degenerate_group_rate", "time_step")
PANELS = ("solver_format_valid_rate", "reward_mean", "num_train_samples")


def run(name: str, out: Path, steps: int, extra: list[str]) -> float:
    """Train one arm (resumes if its folder has a checkpoint); return its wall seconds."""
    cmd = [sys.executable, "-m", "pop_nemo.cli", "train", "--config", str(ROOT / "conf/learning_cpu.yaml")]
    cmd += ["--output-dir", str(out / name), f"trainer.max_steps={steps}", *extra]
    t0 = time.time()
    with open(out / f"{name}.log", "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ)
    return time.time() - t0


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return read_rows(path)


def thirds(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if len(vals) < 3:
        return None, None
    k = len(vals) // 3
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def summarize(out: Path, walls: dict[str, float]) -> dict:
    summary: dict = {}
    for name in ("trained", "control"):
        rows = read_metrics(out / name / "metrics.jsonl")
        arm: dict = {
            "steps": len(rows),
            "wall_s": walls.get(name),
            "steps_with_update": sum(r.get("loss") is not None for r in rows),  # else every sample was masked
            "step_seconds_total": sum(r["time_step"] for r in rows),
        }
        for key in KEYS:
            first, last = thirds(rows, key)
            arm[key] = {"first_third": first, "last_third": last}
        summary[name] = arm
    (out / "learning.json").write_text(json.dumps(summary, indent=1))
    return summary


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 3.6))
    for name, style in (("trained", "-"), ("control", "--")):
        rows = read_metrics(out / name / "metrics.jsonl")
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, PANELS):
            vals = [float("nan") if r.get(key) is None else r[key] for r in rows]  # None: all masked
            ax.plot(steps, vals, style, marker=".", label=name)
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    png = out / "learning.png"
    fig.savefig(png, dpi=110)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs/learning")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--arm", choices=("trained", "control", "both"), default="both")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    if not args.plot_only:
        arms = {"trained": [], "control": ["policy.lr=0"]}
        for name, extra in arms.items():
            if args.arm in (name, "both"):
                walls[name] = run(name, args.out, args.steps, extra)
    print(json.dumps(summarize(args.out, walls), indent=1))
    print(plot(args.out))


if __name__ == "__main__":
    main()
