"""Resume guards: what a checkpoint refuses, ranks that disagree on where to resume, and --fresh."""

from __future__ import annotations

import pytest

from pop_nemo.checkpoint import Checkpoint, Checkpointer, ResumeError, atomic_dir, discard, resume_guard
from pop_nemo.config import load_config
from pop_nemo.distributed import check_ranks_resume_together, resume_disagreement


def _ckpt(tmp_path, cfg, **drop) -> Checkpoint:
    guarded = resume_guard(cfg)
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


class _NoWeights:
    def save(self, path):
        path.mkdir(parents=True)


def test_resume_point_checks_the_config_and_honours_require(tmp_path):
    cfg = load_config(None, [])
    ckpts = Checkpointer(tmp_path / "checkpoints", cfg)
    assert ckpts.resume_point() is None  # a new run
    with pytest.raises(ResumeError, match="--resume was given but .*checkpoints holds no checkpoint"):
        ckpts.resume_point(require=True)
    ckpts.save(2, _NoWeights(), {})
    assert ckpts.resume_point(require=True).step == 2
    with pytest.raises(ResumeError, match="seed"):
        Checkpointer(tmp_path / "checkpoints", load_config(None, ["seed=7"])).resume_point()


def test_fresh_discards_only_the_named_outputs(tmp_path):
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "keep.txt").write_text("mine")
    discard(tmp_path, ("checkpoints", "metrics.jsonl", "tb"))  # tb: absent, fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


class _FilePolicy:
    """Stands in for a policy's own save (the weights are not what this test is about)."""

    def save(self, path) -> None:
        path.mkdir(parents=True)
        (path / "weights").write_text("w")


def test_state_json_holds_only_what_resume_reads(tmp_path):
    """Every setting a resume compares is under ``guarded`` and is compared; there is no second,
    unread fingerprint of the config (a ``config_hash`` was written and never checked)."""
    cfg = load_config(None, [])
    ckpt = Checkpointer(tmp_path, cfg)
    ckpt.save(1, _FilePolicy(), {"corpus": {}, "rng": {}, "offsets": {}})
    state = ckpt.latest().state
    assert set(state) == {"step", "guarded", "corpus", "rng", "offsets"}
    assert state["guarded"] == resume_guard(cfg)
    ckpt.check_compatible(ckpt.latest())
    with pytest.raises(ResumeError, match="rollout.n"):
        Checkpointer(tmp_path, load_config(None, ["rollout.n=8"])).resume_point()


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "sub" / "model"
    with atomic_dir(out, ".t-") as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()  # nothing shows before the end
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with atomic_dir(out, ".t-") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # the old folder is replaced, not merged
    with pytest.raises(RuntimeError), atomic_dir(out, ".t-") as tmp:
        (tmp / "c").write_text("3")
        raise RuntimeError("killed halfway")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temporary folder left behind
