"""Ranks, the world and collectives: the base layer's view of ``torch.distributed``.

Rank and world come from the environment torchrun sets (or Slurm's, mapped by
:func:`discover_env`), so asking "which rank am I" needs no process group; collectives go
through one initialised group (:func:`init_distributed`), NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import os
import re
import socket
from datetime import timedelta

from pop_nemo.errors import ResumeError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def resume_disagreement(steps: list[int]) -> str | None:
    """Why ranks cannot resume together (each rank's checkpoint step, by rank), or None."""
    if len(set(steps)) <= 1:
        return None
    shown = ", ".join(f"rank {r}: step {s}" for r, s in enumerate(steps))
    return (
        f"the ranks found different checkpoints to resume from ({shown}); the run was stopped between "
        "the ranks' saves, or its folder was copied without ranks/. Delete the newer checkpoints so all "
        "ranks hold the same latest step, or start again with --fresh"
    )


def check_ranks_resume_together(step: int) -> None:
    """Fail on every rank, instead of hanging in the policy's collective load, when ranks disagree."""
    if why := resume_disagreement(all_gather(step)):
        raise ResumeError(why)  # the CLI prints it as one line and exits 2


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list (``node[01-04,07],other`` → ``node01``) without scontrol."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def discover_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables for this process, from torchrun's or Slurm's environment.

    Returns the variables that were missing and are now set (empty when torchrun set them all
    or when this is a single process)."""
    env = os.environ if environ is None else environ
    added: dict[str, str] = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        return added
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        added["RANK"] = env["SLURM_PROCID"]
        added["WORLD_SIZE"] = env["SLURM_NTASKS"]
        added["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        added["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        if "MASTER_ADDR" not in env:
            added["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        if "MASTER_PORT" not in env:
            added["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    env.update(added)
    return added


def init_distributed(timeout_s: float = 1800) -> None:
    """Initialise ``torch.distributed`` once (NCCL on GPUs, gloo on CPU); a world of one when unset."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    discover_env()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world_size() > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun, srun or --nproc")
        os.environ["MASTER_PORT"] = str(free_port())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        rank=rank(),
        world_size=world_size(),
        timeout=timedelta(seconds=timeout_s),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sum_over_ranks(per_rank: list[dict[str, float] | None]) -> dict[str, float]:
    """Key-wise sum of each rank's metric totals (a rank may report nothing: ``None`` or ``{}``).

    Right for metrics that every rank already divided by the *global* normalizer (loss, kl,
    clip_frac): the sum is then the whole batch's mean."""
    out: dict[str, float] = {}
    for d in per_rank:
        for k, v in (d or {}).items():
            out[k] = out.get(k, 0.0) + v
    return out


def all_sum_metrics(totals: dict[str, float]) -> dict[str, float]:
    """:func:`sum_over_ranks` across the process group (every rank gets the result)."""
    return sum_over_ranks(all_gather(totals))


def shard(n: int, parts: int, index: int) -> range:
    """The ``index``-th of ``parts`` contiguous shares of ``range(n)``, balanced to within one item
    (the first ``n % parts`` shares hold one more). Contiguous shares concatenated in rank order
    give back ``range(n)``, so results gathered by rank stay in item order."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"share {index} of {parts} does not exist")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def all_gather[T](obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order (``[obj]`` in one process). Pickled, so meant for small
    Python objects (token ids, text, counts), not for tensors of logits or weights."""
    if not is_initialized():
        return [obj]
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return [obj]
    gathered: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered  # type: ignore[return-value]
