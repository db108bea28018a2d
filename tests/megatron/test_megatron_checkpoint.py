"""HF → Megatron → HF round trip, export after training, refit weights, save/resume (CPU)."""

from __future__ import annotations

import pytest

from tests.megatron import checks

LAYOUTS = ["tp2", "pp2", "dp2"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hf_megatron_hf_roundtrip_is_exact(cpu_results, layout):
    checks.assert_roundtrip(cpu_results[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_after_training_matches_megatron(cpu_results, layout):
    checks.assert_export_after_training(cpu_results[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_equals_uninterrupted_run(cpu_results, layout):
    checks.assert_resume(cpu_results[layout])


def test_resume_tp2_checkpoint_with_pp2_layout(cpu_results):
    """Distributed checkpoints reshard: TP=2 saved, PP=2 resumed, same steps 2-3."""
    checks.assert_steps_close(cpu_results["pp2"]["resumed_from_tp2_trajectory"], cpu_results["tp2"]["trajectory"][1:])
