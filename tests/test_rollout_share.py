"""Data-parallel self-play's pure parts: the split by whole groups and the merge of the ranks' shares."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop_nemo.build import check_policy_backend, check_rollout_backend
from pop_nemo.config import ConfigError, load_config
from pop_nemo.corpus import Document
from pop_nemo.distributed import shard
from pop_nemo.rl.rollout_share import Share, merge, merge_critic_metrics
from pop_nemo.selfplay.stage import Example
from tests.conftest import TINY, run_cli


def test_shard_exact_values():
    assert [shard(5, 2, i) for i in range(2)] == [range(0, 3), range(3, 5)]
    assert [shard(4, 4, i) for i in range(4)] == [range(i, i + 1) for i in range(4)]
    assert [shard(1, 2, i) for i in range(2)] == [range(0, 1), range(1, 1)]  # a rank may get no group
    assert [shard(7, 3, i) for i in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]


@given(st.integers(0, 200), st.integers(1, 16))
def test_shares_tile_the_step_in_order_and_balance(n, parts):
    shares = [shard(n, parts, i) for i in range(parts)]
    assert [i for s in shares for i in s] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("parts,index", [(0, 0), (2, 2), (2, -1)])
def test_shard_rejects_a_share_that_does_not_exist(parts, index):
    with pytest.raises(ValueError, match="does not exist"):
        shard(4, parts, index)


def _examples(ids: range) -> list[Example]:
    return [Example(g, Document(id=f"d{g}", text=f"text {g}")) for g in ids]


def test_merge_puts_groups_in_order_and_reports_the_whole_step():
    shares = [
        Share(_examples(range(0, 2)), {"propose": 1.0, "solve": 4.0}, 30, {}),
        Share(_examples(range(2, 3)), {"propose": 2.5, "solve": 3.0}, 12, {}),
    ]
    step = merge(shares)
    assert [e.group_id for e in step.examples] == [0, 1, 2]
    assert step.seconds == {"propose": 2.5, "solve": 4.0}  # the slowest rank's, per stage
    assert list(step.seconds) == ["propose", "solve"]
    assert step.generated_tokens == 42
    assert step.metrics == {"generated_tokens_rank_0": 30, "generated_tokens_rank_1": 12}


def test_merge_of_one_rank_adds_no_per_rank_keys():
    step = merge([Share(_examples(range(3)), {"judge": 0.5}, 7, {"critic_replicas_up": 2})])
    assert step.metrics == {"critic_replicas_up": 2} and step.generated_tokens == 7


def test_critic_metrics_add_up_over_ranks():
    rank0 = {
        "critic_replicas_up": 2,
        "critic_items_r0": 6,
        "critic_failures_r0": 1,
        "critic_requests_r0": 3,
        "critic_latency_s_r0": 2.0,
        "critic_items_r1": 0,
        "critic_failures_r1": 0,
        "critic_requests_r1": 0,
        "critic_latency_s_r1": None,
    }
    rank1 = {
        "critic_replicas_up": 1,
        "critic_items_r0": 4,
        "critic_failures_r0": 0,
        "critic_requests_r0": 1,
        "critic_latency_s_r0": 6.0,
        "critic_items_r1": 2,
        "critic_failures_r1": 2,
        "critic_requests_r1": 2,
        "critic_latency_s_r1": 0.5,
    }
    assert merge_critic_metrics([rank0, rank1]) == {
        "critic_replicas_up": 1,
        "critic_items_r0": 10,
        "critic_failures_r0": 1,
        "critic_requests_r0": 4,
        "critic_latency_s_r0": 3.0,  # (2.0 × 3 + 6.0 × 1) / 4 requests
        "critic_items_r1": 2,
        "critic_failures_r1": 2,
        "critic_requests_r1": 2,
        "critic_latency_s_r1": 0.5,
    }
    assert merge_critic_metrics([{}, {}]) == {}  # in-process critics report nothing


def test_hf_policy_under_several_ranks_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"policy.backend='hf' trains in one process.*policy.backend=megatron"):
        check_policy_backend(load_config(TINY, []))


def test_trtllm_tensor_parallel_under_several_ranks_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config(TINY, ["rollout.backend=trtllm", "rollout.trtllm.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"rollout.trtllm.tensor_parallel_size=2 with 4 trainer ranks"):
        check_rollout_backend(cfg)


def test_a_rank_that_fails_alone_says_why_in_one_line(tmp_path):
    """A non-zero rank prints nothing but its own error: one line, with its rank, exit code 2."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = run_cli("train", "--config", str(TINY), "--output-dir", str(tmp_path), check=False, env=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error (rank 1): 2 ranks (--nproc"), proc.stderr
