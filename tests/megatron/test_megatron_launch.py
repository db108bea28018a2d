"""Rank discovery for torchrun / srun, `--nproc` argument handling, the data-parallel split."""

from __future__ import annotations

import argparse

import pytest

from pop_nemo import distributed, launch


def test_slurm_env_maps_to_torch_distributed():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_NTASKS_PER_NODE": "8(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08],other",
        "SLURM_JOB_ID": "123456",
    }
    added = distributed.discover_env(env)
    assert added["RANK"] == "5" and added["WORLD_SIZE"] == "16" and added["LOCAL_RANK"] == "5"
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["LOCAL_WORLD_SIZE"] == "8"
    assert 20000 <= int(env["MASTER_PORT"]) < 40000


def test_torchrun_env_is_left_alone():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert distributed.discover_env(env) == {}
    assert env["RANK"] == "1"


def test_single_slurm_task_is_not_distributed():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert distributed.discover_env(env) == {}


def test_slurm_nodelist_forms():
    assert distributed._first_slurm_host("node01") == "node01"
    assert distributed._first_slurm_host("n[3,5-7]") == "n3"


def test_command_argv_drops_nproc_and_keeps_everything_else():
    args = argparse.Namespace(
        command="train",
        config="conf/pop_7b.yaml",
        output_dir="runs/x",
        resume=True,
        fresh=False,
        overrides=["trainer.max_steps=3"],
        nproc=8,
    )
    argv = launch.command_argv(args)
    assert argv == [
        "train",
        "--config",
        "conf/pop_7b.yaml",
        "--output-dir",
        "runs/x",
        "--resume",
        "trainer.max_steps=3",
    ]
    cmd = launch.torchrun_command(8, ["-m", "pop_nemo.cli", *argv], port=29999)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nnodes"]
    assert "--nproc-per-node" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "8"
    assert cmd[cmd.index("--master-port") + 1] == "29999"
    assert cmd[-len(argv) - 2 :] == ["-m", "pop_nemo.cli", *argv]
    dpo = argparse.Namespace(
        command="dpo", config="c.yaml", pairs="p.jsonl", output_dir=None, resume=False, fresh=True, overrides=[]
    )
    assert launch.command_argv(dpo) == ["dpo", "--config", "c.yaml", "--pairs", "p.jsonl", "--fresh"]


def test_non_zero_ranks_write_elsewhere(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    over = launch.rank_overrides("runs/x")
    assert "output_dir=runs/x/ranks/rank_1" in over and "logging.tensorboard=false" in over
    monkeypatch.setenv("RANK", "0")
    assert launch.rank_overrides("runs/x") == []


def test_data_parallel_split_keeps_row_groups_whole():
    from pop_nemo.policies.megatron import local_rows

    # 3 DPO pairs = 6 rows over 2 ranks, micro-batches of 2 rows (1 pair): 2 pairs, then 1 (+ padding)
    assert [local_rows(6, 2, r, 2, group=2) for r in (0, 1)] == [(0, 4, 2), (4, 6, 2)]
    # without groups the same rows split 3 + 3, cutting pair 1 across the ranks
    assert [local_rows(6, 2, r, 2) for r in (0, 1)] == [(0, 3, 2), (3, 6, 2)]
    # more ranks than groups: the last rank gets none and runs padding micro-batches
    assert [local_rows(4, 4, r, 2, group=2) for r in range(4)] == [(0, 2, 1), (2, 4, 1), (4, 4, 1), (4, 4, 1)]
    assert local_rows(32, 2, 1, 4, group=2) == (16, 32, 4)


def test_megatron_backend_on_a_machine_without_cuda_is_a_config_error():
    from pop_nemo.build import check_policy_backend
    from pop_nemo.config import ConfigError, load_config
    from pop_nemo.policies.megatron import runs_here

    if runs_here():
        pytest.skip("this machine can run the Megatron policy")
    with pytest.raises(ConfigError, match="policy.backend=megatron needs"):
        check_policy_backend(load_config(None, ["policy.backend=megatron"]))
    check_policy_backend(load_config(None, []))  # hf: nothing to check
