"""Run outputs: metrics.jsonl and records.jsonl (appended one step at a time), TensorBoard,
optional W&B, and the console (a progress bar and one summary line per step)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pop_nemo.jsonl import read_rows

# soft_wrap: a message is one line in a log file (Slurm's, CI's), not cut at 80 columns.
console = Console(stderr=True, highlight=False, soft_wrap=True)


def step_progress(enabled: bool) -> Progress:
    """The trainers' progress bar (on stderr, gone when done; off under Slurm or ``logging.progress=false``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append whole lines in one write and fsync; resume cuts back to the checkpoint's offset."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_rows(path)


class RunLogger:
    FILES = ("metrics.jsonl", "records.jsonl")

    def __init__(
        self, out: Path, tensorboard: bool = True, wandb_project: str | None = None, config: dict | None = None
    ):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    "logging.wandb_project is set but wandb is not installed: pip install wandb"
                ) from None
            self.wandb = wandb.init(project=wandb_project, dir=str(self.out), config=config or {}, resume="allow")

    def offsets(self) -> dict[str, int]:
        return {n: (self.out / n).stat().st_size if (self.out / n).exists() else 0 for n in self.FILES}

    def truncate(self, offsets: dict[str, int]) -> None:
        """Cut outputs back to a checkpoint: whatever a killed step wrote after it goes."""
        for name in self.FILES:
            p = self.out / name
            if p.exists():
                with open(p, "r+b") as f:
                    f.truncate(offsets.get(name, 0))

    def log(self, step: int, metrics: dict[str, Any], records: list[dict[str, Any]]) -> None:
        append_jsonl(self.out / "records.jsonl", records)
        append_jsonl(self.out / "metrics.jsonl", [{k: _clean(v) for k, v in metrics.items()}])
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                if k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def summary_line(m: dict[str, Any]) -> str:
    def f(key: str, fmt: str = ".3f") -> str:
        v = m.get(key)
        return "—" if v is None else format(v, fmt)

    return (
        f"step {m['step']:>4} | reward {f('reward_mean')} ± {f('reward_std')} | format {f('solver_format_valid_rate', '.0%')}"
        f" | propose {f('proposer_valid_rate', '.0%')} rubric {f('rubric_valid_rate', '.0%')} judge {f('judge_valid_rate', '.0%')}"
        f" | kl {f('kl', '.4f')} loss {f('loss', '.4f')} | {f('tokens_per_s', '.0f')} tok/s | {f('time_step', '.0f')}s"
    )
