"""Atomic checkpoints and the resume guard.

``DIR/checkpoints/step_000002/`` is written under a temporary name and renamed into place, then
``DIR/checkpoints/latest`` is replaced atomically: a kill at any moment leaves the previous
checkpoint whole. ``state.json`` holds everything besides the weights: step, the settings a
resume must not change (:func:`resume_guard`, compared on resume), corpus cursor, RNG states and the byte offsets of the JSONL outputs (a
resumed run cuts them back, so records match an uninterrupted run exactly).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pop_nemo.config import Config
from pop_nemo.errors import ResumeError

__all__ = [
    "Checkpoint",
    "Checkpointer",
    "ResumeError",
    "atomic_dir",
    "atomic_write_text",
    "discard",
    "resume_guard",
    "restore",
    "rng_state",
]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out: Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """A folder to fill under a temporary name beside ``out``; on success it replaces ``out``
    whole, so a reader (or a kill) never sees half of it. On an error ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


RunKind = Literal["train", "dpo", "synthesize"]


def resume_guard(cfg: Config, run: RunKind = "train", pairs_sha256: str | None = None) -> dict[str, Any]:
    """The settings a resume must not change, by kind of run: the one list of them.

    ``train``: what changes what a training step means (model, task, data, roles, algorithm,
    group shape, policy backend: an HF checkpoint is no Megatron one). ``dpo``: the pairs file,
    the model and the ``dpo.*`` settings but for bookkeeping. ``synthesize``: what shapes a
    record (not how many documents, in what chunks, or the pair filter applied later)."""
    d = cfg.to_dict()
    if run == "train":
        return {
            "task": d["task"],
            "seed": d["seed"],
            "model": d["model"],
            "corpus": d["corpus"],
            "roles": d["roles"],
            "algo": d["algo"],
            "rollout.n": d["rollout"]["n"],
            "rollout.docs_per_step": d["rollout"]["docs_per_step"],
            "policy.backend": d["policy"]["backend"],
        }
    if run == "dpo":
        dpo = {k: v for k, v in d["dpo"].items() if k not in _DPO_BOOKKEEPING}
        return {"pairs_sha256": pairs_sha256, "dpo": dpo, "model": d["model"]}
    off = {k: v for k, v in d["offline"].items() if k not in _SYNTHESIS_NOT_SHAPING}
    off["teacher"] = {k: off["teacher"][k] for k in ("model", "roles", "guide_format")}
    return {
        "task": d["task"],
        "seed": d["seed"],
        "model": d["model"],
        "corpus": d["corpus"],
        "rollout": {k: d["rollout"][k] for k in ("proposer", "solver", "rubric", "judge", "guide")},
        "answer_fallback": d["algo"]["answer_fallback"],
        "offline": off,
    }


_DPO_BOOKKEEPING = ("save_every", "keep_checkpoints", "max_steps", "export", "eval_batch_size")
_SYNTHESIS_NOT_SHAPING = (
    "num_documents",
    "chunk_size",
    "best_of_n",
    "std_threshold",
    "max_length_diff_words",
    "length_words",
    "shuffle_seed",
    "max_pairs",
)


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def discard(out: Path, names: tuple[str, ...]) -> None:
    """``--fresh``: remove a previous run's outputs (files or folders) under ``out``, where present."""
    for name in names:
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def restore(ckpt: Checkpoint, policy, logger) -> int:
    """What every trainer restores: the policy (weights, optimizer, schedule), the RNG, and the logs
    cut back to the checkpoint's offsets. Returns the step to go on from."""
    policy.load(ckpt.path / "policy")
    set_rng_state(ckpt.state["rng"])
    logger.truncate(ckpt.state["offsets"])
    return ckpt.step


class Checkpointer:
    def __init__(self, root: Path, cfg: Config, keep: int = 2):
        self.root, self.cfg, self.keep = Path(root), cfg, keep

    def latest(self) -> Checkpoint | None:
        marker = self.root / "latest"
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        state_file = path / "state.json"
        if not state_file.is_file():
            raise ResumeError(f"{marker} points at {path}, which has no state.json; the checkpoint folder was damaged")
        return Checkpoint(path, json.loads(state_file.read_text()))

    def resume_point(self, require: bool = False) -> Checkpoint | None:
        """The checkpoint a run goes on from, checked against this config; None starts a new run.
        ``require`` (``--resume``) makes "no checkpoint" an error."""
        ckpt = self.latest()
        if ckpt is not None:
            self.check_compatible(ckpt)
        elif require:
            raise ResumeError(f"--resume was given but {self.root} holds no checkpoint")
        return ckpt

    def check_compatible(self, ckpt: Checkpoint) -> None:
        """Refuse a checkpoint of another model or of a config that changes what training means."""
        saved, now = ckpt.state.get("guarded", {}), resume_guard(self.cfg)
        # A key that a checkpoint predates (policy.backend came later) is not compared.
        diffs = [k for k in sorted(now) if k in saved and saved[k] != now[k]]
        if diffs:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diffs[:4])
            raise ResumeError(
                f"cannot resume from {ckpt.path}: it was made with a different config ({detail}). "
                "Use another --output-dir, or --fresh to discard it."
            )

    def save(self, step: int, policy, extra: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:06d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        policy.save(tmp / "policy")
        state = {"step": step, "guarded": resume_guard(self.cfg), **extra}
        (tmp / "state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.root / "latest", name)
        self._prune(name)
        return final

    def _prune(self, current: str) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for p in done[: max(len(done) - self.keep, 0)]:
            if p.name != current:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
