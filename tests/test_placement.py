"""Where HF engines run: the one placement rule (``build.engine_device``), and what reports it."""

from __future__ import annotations

import pytest

from pop_nemo.build import engine_device
from pop_nemo.config import ConfigError


@pytest.mark.parametrize(
    ("cuda_devices", "local_rank", "policy_device", "want"),
    [
        (0, 0, "cpu", "cpu"),  # this machine: policy on the CPU, engines too
        (0, 3, None, "cpu"),  # no GPU and no policy: the CPU
        (8, 3, "cuda:3", "cuda:3"),  # Megatron rank 3 of a node: its engines on its own GPU, not the host CPU
        (8, 3, "cuda", "cuda:3"),
        (8, 0, "cpu", "cpu"),  # a policy kept on the CPU keeps its engines there, GPUs or not
        (8, 5, None, "cuda:5"),  # critic server / eval / synthesis rank 5: its GPU
        (4, 5, "cuda:1", "cuda:1"),  # more local ranks than GPUs: wrap around, as init_distributed does
        (1, 0, None, "cuda:0"),
    ],
)
def test_auto_follows_the_policy_and_the_local_rank(cuda_devices, local_rank, policy_device, want):
    assert engine_device(cuda_devices, local_rank, policy_device) == want


def test_an_explicit_device_wins_and_cuda_without_a_gpu_is_a_config_error():
    assert engine_device(8, 2, "cuda:2", requested="cpu") == "cpu"
    assert engine_device(2, 3, None, requested="cuda") == "cuda:1"
    with pytest.raises(ConfigError, match="device=cuda but no CUDA device is visible"):
        engine_device(0, 0, None, requested="cuda")
    with pytest.raises(ConfigError, match="'gpu' is unknown; use auto, cpu or cuda"):
        engine_device(1, 0, None, requested="gpu")


def test_doctor_says_where_the_policy_and_engines_live(monkeypatch):
    import torch

    from pop_nemo.doctor import placement_report

    monkeypatch.setenv("LOCAL_RANK", "0")
    line = placement_report()
    if torch.cuda.is_available():
        assert "HF policy on cuda:0, its rollout engines on cuda:0" in line
    else:
        assert "HF policy on cpu, its rollout engines on cpu" in line
