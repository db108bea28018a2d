"""Resume guards: what a checkpoint refuses, and ranks that disagree on where to resume."""

from __future__ import annotations

import pytest

from pop_nemo.checkpoint import Checkpoint, Checkpointer, ResumeError, _guarded
from pop_nemo.config import load_config
from pop_nemo.launch import check_ranks_resume_together, resume_disagreement


def _ckpt(tmp_path, cfg, **drop) -> Checkpoint:
    guarded = _guarded(cfg)
    for k in drop:
        guarded.pop(k)
    return Checkpoint(tmp_path, {"step": 3, "guarded": guarded})


def test_a_checkpoint_of_the_other_policy_backend_is_refused(tmp_path):
    hf = load_config(None, [])
    ckpt = _ckpt(tmp_path, hf)
    Checkpointer(tmp_path, hf).check_compatible(ckpt)  # same config: fine
    megatron = load_config(None, ["policy.backend=megatron"])
    with pytest.raises(ResumeError, match=r"policy.backend: checkpoint 'hf' vs now 'megatron'.*--fresh"):
        Checkpointer(tmp_path, megatron).check_compatible(ckpt)


def test_a_key_the_checkpoint_predates_is_not_compared(tmp_path):
    megatron = load_config(None, ["policy.backend=megatron"])
    old = _ckpt(tmp_path, megatron, **{"policy.backend": None})
    Checkpointer(tmp_path, megatron).check_compatible(old)
    with pytest.raises(ResumeError, match="seed"):
        Checkpointer(tmp_path, load_config(None, ["policy.backend=megatron", "seed=7"])).check_compatible(old)


def test_ranks_must_resume_from_the_same_step():
    assert resume_disagreement([4, 4, 4]) is None
    assert resume_disagreement([0]) is None
    why = resume_disagreement([4, 3])
    assert "rank 0: step 4, rank 1: step 3" in why and "--fresh" in why


def test_single_process_needs_no_agreement():
    check_ranks_resume_together(5)  # no process group: returns without a collective
