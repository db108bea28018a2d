"""Multi-process launch for ``pop-nemo train`` and ``dpo``: ``--nproc N``, ``torchrun`` and Slurm ``srun``.

* ``pop-nemo train --nproc 2 ...`` (or ``dpo``) re-runs the same command under ``torch.distributed.run``
  (single node, a free loopback port), one process per rank.
* Under ``torchrun`` the usual ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` are set already.
* Under ``srun`` (one task per GPU) :func:`discover_env` maps ``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID`` to those names and takes the master address from the first host of
  ``SLURM_JOB_NODELIST`` (``MASTER_PORT`` defaults to a port derived from the job id).

Every rank runs the same loop (online, or DPO) with the same seed. The policy is the only collective
part: :class:`pop_nemo.policies.megatron.MegatronPolicy` takes rank 0's batch (broadcast) so a
rank whose rollouts diverged cannot train on different data, and it writes checkpoints into
rank 0's folder. Outputs (metrics, records, checkpoint state) are rank 0's; other ranks write
theirs under ``<output_dir>/ranks/rank_<r>/`` where they are never read by a user, and print
nothing to the console (:func:`rank_config`).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from datetime import timedelta


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


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
    import torch.distributed as dist

    from pop_nemo.checkpoint import ResumeError

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    steps: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(steps, step)
    if why := resume_disagreement(steps):
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


def torchrun_command(nproc: int, module_args: list[str], port: int | None = None) -> list[str]:
    """``python -m torch.distributed.run`` for ``python -m pop_nemo.cli <module_args>`` on this node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port or free_port()),
        "-m",
        "pop_nemo.cli",
        *module_args,
    ]


def command_argv(args) -> list[str]:
    """``pop-nemo train`` / ``dpo`` arguments equivalent to a parsed namespace, without ``--nproc``."""
    argv = [args.command, "--config", str(args.config)]
    for name in ("pairs", "output_dir"):
        if value := getattr(args, name, None):
            argv += ["--" + name.replace("_", "-"), str(value)]
    argv += [f"--{name}" for name in ("resume", "fresh") if getattr(args, name, False)]
    return argv + list(args.overrides)


def relaunch(args) -> int:
    """``pop-nemo train|dpo --nproc N``: the same command as N ranks under torchrun; its exit code."""
    if args.nproc < 1:
        raise ValueError("--nproc must be >= 1")
    if world_size() > 1:
        raise RuntimeError("--nproc was given inside a multi-rank launch (torchrun/srun): leave it out")
    from pop_nemo.build import check_policy_backend
    from pop_nemo.config import ConfigError, load_config

    cfg = load_config(args.config, list(args.overrides))  # a bad field fails here once, not on every rank
    if args.nproc > 1 and cfg.policy.backend != "megatron":
        raise ConfigError(
            f"--nproc {args.nproc} starts ranks of the Megatron policy, but policy.backend={cfg.policy.backend!r} "
            "trains in one process: add policy.backend=megatron, or leave --nproc out"
        )
    check_policy_backend(cfg)
    return subprocess.call(torchrun_command(args.nproc, command_argv(args)))


def rank_overrides(output_dir: str) -> list[str]:
    """Config overrides for a non-zero rank: its own scratch output folder, no TensorBoard/W&B,
    no progress bar. Empty on rank 0 and in a single process."""
    r = rank()
    if world_size() <= 1 or r == 0:
        return []
    return [
        f"output_dir={os.path.join(output_dir, 'ranks', f'rank_{r}')}",
        "logging.tensorboard=false",
        "logging.wandb_project=null",
        "logging.progress=false",
    ]


def rank_config(config: str | None, overrides: list[str], output_dir: str | None = None):
    """The config this process runs: ``--output-dir`` applied, and on a non-zero rank its scratch
    folder (:func:`rank_overrides`) and a quiet console (rank 0 reports for all)."""
    from pop_nemo.config import load_config
    from pop_nemo.logging import console

    overrides = list(overrides) + ([f"output_dir={output_dir}"] if output_dir else [])
    cfg = load_config(config, overrides)
    discover_env()  # torchrun / srun ranks: rank 0 owns the outputs
    if extra := rank_overrides(cfg.output_dir):
        cfg = load_config(config, overrides + extra)
        console.quiet = True
    return cfg
