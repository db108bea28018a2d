"""The same properties on CUDA (NCCL): `pytest -m gpu tests/megatron` on a GPU machine.

With one GPU the layout is TP=1 (world 1); with two or more, TP=2, PP=2 and DP=2 as on CPU.
"""

from __future__ import annotations

import pytest

from tests.megatron import checks

pytestmark = pytest.mark.gpu


def test_gpu_layouts_match_hf(gpu_results):
    assert gpu_results["device"] == "cuda"
    layouts = [k for k in ("tp1", "tp2", "pp2", "dp2") if k in gpu_results]
    assert layouts
    for layout in layouts:
        checks.assert_all(gpu_results, layout)
