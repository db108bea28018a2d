"""Rank discovery for torchrun / srun, and `pop-nemo train --nproc` argument handling."""

from __future__ import annotations

import argparse

from pop_nemo import launch


def test_slurm_env_maps_to_torch_distributed():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_NTASKS_PER_NODE": "8(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08],other",
        "SLURM_JOB_ID": "123456",
    }
    added = launch.discover_env(env)
    assert added["RANK"] == "5" and added["WORLD_SIZE"] == "16" and added["LOCAL_RANK"] == "5"
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["LOCAL_WORLD_SIZE"] == "8"
    assert 20000 <= int(env["MASTER_PORT"]) < 40000


def test_torchrun_env_is_left_alone():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert launch.discover_env(env) == {}
    assert env["RANK"] == "1"


def test_single_slurm_task_is_not_distributed():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert launch.discover_env(env) == {}


def test_slurm_nodelist_forms():
    assert launch._first_slurm_host("node01") == "node01"
    assert launch._first_slurm_host("n[3,5-7]") == "n3"


def test_train_argv_drops_nproc_and_keeps_everything_else():
    args = argparse.Namespace(
        config="conf/pop_7b.yaml",
        output_dir="runs/x",
        resume=True,
        fresh=False,
        overrides=["trainer.max_steps=3"],
        nproc=8,
    )
    argv = launch.train_argv(args)
    assert argv == [
        "train",
        "--config",
        "conf/pop_7b.yaml",
        "--output-dir",
        "runs/x",
        "--resume",
        "trainer.max_steps=3",
    ]
    cmd = launch.torchrun_command(8, argv, port=29999)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nnodes"]
    assert "--nproc-per-node" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "8"
    assert cmd[-len(argv) :] == argv


def test_non_zero_ranks_write_elsewhere(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    over = launch.rank_overrides("runs/x")
    assert "output_dir=runs/x/ranks/rank_1" in over and "logging.tensorboard=false" in over
    monkeypatch.setenv("RANK", "0")
    assert launch.rank_overrides("runs/x") == []
