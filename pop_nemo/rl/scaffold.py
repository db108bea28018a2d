"""The run scaffold that ``pop-nemo train`` and ``pop-nemo dpo`` share.

Everything around a trainer's steps: the stop signal (SIGUSR1: checkpoint after the step, exit
75), threads and seeds, ``--fresh``, the checkpoint to resume from (checked against the config,
and across ranks), the run outputs and ``config.yaml``, the restore, and the save/stop tail of
every step. A trainer says only what its steps are.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import yaml

from pop_nemo import distributed, signals
from pop_nemo.checkpoint import Checkpoint, Checkpointer, discard, restore, rng_state
from pop_nemo.config import Config
from pop_nemo.run_output import RunLogger


class RunScaffold:
    def __init__(
        self,
        cfg: Config,
        out: str | Path,
        *,
        seed: int,
        outputs: tuple[str, ...],
        keep: int,
        save_every: int,
        fresh: bool = False,
        require_resume: bool = False,
    ):
        """Before any model loads: signals, threads, seeds, ``--fresh`` (removes ``outputs``) and
        the checkpoint a run goes on from (``resume``; None starts a new run)."""
        self.stop = signals.install()
        self.cfg, self.out, self.save_every = cfg, Path(out), save_every
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        random.seed(seed)
        torch.manual_seed(seed)
        if fresh:
            discard(self.out, outputs)
        self.ckpt = Checkpointer(self.out / "checkpoints", cfg, keep=keep)
        self.resume: Checkpoint | None = self.ckpt.resume_point(require=require_resume)
        self.logger: RunLogger | None = None

    @property
    def resume_step(self) -> int:
        return self.resume.step if self.resume is not None else 0

    def open(self, policy) -> int:
        """After the policy is built: ranks agree on the step, outputs open, ``config.yaml`` is
        written, and a resumed run restores policy, RNG and logs. Returns the first step to run."""
        distributed.check_ranks_resume_together(self.resume_step)
        self.out.mkdir(parents=True, exist_ok=True)
        c = self.cfg
        self.logger = RunLogger(self.out, c.logging.tensorboard, c.logging.wandb_project, c.to_dict())
        (self.out / "config.yaml").write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))
        if self.resume is None:
            return 0
        return restore(self.resume, policy, self.logger)

    def log(self, step: int, metrics: dict[str, Any], records: list[dict[str, Any]]) -> None:
        assert self.logger is not None, "open() first"
        self.logger.log(step, metrics, records)

    def save_if_due(self, step: int, last: bool, policy, state: dict[str, Any]) -> None:
        """Checkpoint after ``step`` on a stop signal, every ``save_every`` steps, and at the end;
        ``state`` is the trainer's own (corpus cursor, guards), RNG and log offsets are added."""
        assert self.logger is not None, "open() first"
        if self.stop.poll() or step % self.save_every == 0 or last:
            self.ckpt.save(step, policy, {**state, "rng": rng_state(), "offsets": self.logger.offsets()})

    def exit_if_stopped(self, step: int, last: bool) -> None:
        """After a stop signal and the checkpoint of ``step``: close the outputs and exit 75."""
        if self.stop.stopped and not last:
            self.close()
            self.stop.exit_if_stopped(step)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
