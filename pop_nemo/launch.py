"""Multi-process launch for ``pop-nemo train`` and ``dpo``: ``--nproc N``, ``torchrun`` and Slurm ``srun``.

* ``pop-nemo train --nproc 2 ...`` (or ``dpo``) re-runs the same command under ``torch.distributed.run``
  (single node, a free loopback port), one process per rank.
* Under ``torchrun`` the usual ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` are set already.
* Under ``srun`` (one task per GPU) :func:`discover_env` maps ``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID`` to those names and takes the master address from the first host of
  ``SLURM_JOB_NODELIST`` (``MASTER_PORT`` defaults to a port derived from the job id).

Every rank runs the same loop (online, or DPO) with the same seed. Online, each rank plays its
share of a step's documents and the ranks all-gather the groups (``pop_nemo.rl.rollout_share``);
:class:`pop_nemo.policies.megatron.MegatronPolicy` then takes rank 0's batch (broadcast), so ranks
cannot train on different data, and it writes checkpoints into rank 0's folder. Outputs (metrics,
records, checkpoint state) are rank 0's; other ranks write theirs under
``<output_dir>/ranks/rank_<r>/`` where they are never read by a user, and print nothing to the
console (:func:`rank_config`).
"""

from __future__ import annotations

import os
import subprocess
import sys

from pop_nemo.distributed import discover_env, free_port, rank, world_size


def torchrun_command(nproc: int, target: list[str], port: int | None = None) -> list[str]:
    """``python -m torch.distributed.run`` on this node (loopback, a free port) for ``target``:
    ``["-m", "pop_nemo.cli", *argv]``, or a script and its arguments."""
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
        *target,
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
    from pop_nemo.config import load_config

    cfg = load_config(args.config, list(args.overrides))  # a bad field fails here once, not on every rank
    check_policy_backend(cfg, ranks=args.nproc)
    return subprocess.call(torchrun_command(args.nproc, ["-m", "pop_nemo.cli", *command_argv(args)]))


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
    from pop_nemo.run_output import console

    overrides = list(overrides) + ([f"output_dir={output_dir}"] if output_dir else [])
    cfg = load_config(config, overrides)
    discover_env()  # torchrun / srun ranks: rank 0 owns the outputs
    if extra := rank_overrides(cfg.output_dir):
        cfg = load_config(config, overrides + extra)
        console.quiet = True
    return cfg
