"""Assertions on one layout's worker results, shared by the CPU and the GPU tests."""

from __future__ import annotations

import math

LOGPROB_TOL_TINY = 1e-5  # fp32, 2 layers: measured ~5e-7 on CPU
LOGPROB_TOL_SMOL = 1e-4  # fp32, 30 layers, logit scale ~40
REL_TOL = 1e-6  # losses and grad norms: same math, different summation order


def close(a: float, b: float, rel: float = REL_TOL, abs_: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def assert_steps_close(got: list[dict], want: list[dict], keys=("loss", "pg_loss", "kl", "grad_norm", "lr")) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        for k in keys:
            assert close(g[k], w[k]), f"step {i + 1} {k}: megatron {g[k]!r} vs reference {w[k]!r}"


def assert_metrics_rows_match(mg: dict, hf: dict, rel: float, abs_: float = 1e-9, volatile=("time_",)) -> None:
    """One metrics.jsonl row of a Megatron run against the HF run's: the same keys, the same
    integers, floats within ``rel``; wall-clock keys (prefixes ``volatile``) are not compared."""
    keys = {k for k in hf if not k.startswith(volatile)}
    assert keys == {k for k in mg if not k.startswith(volatile)}
    for k in sorted(keys):
        a, b = mg[k], hf[k]
        if isinstance(a, float) or isinstance(b, float):
            assert close(a, b, rel, abs_), f"step {hf['step']} {k}: megatron {a!r} vs hf {b!r}"
        else:
            assert a == b, f"step {hf['step']} {k}: megatron {a!r} vs hf {b!r}"


def assert_logprobs(r: dict) -> None:
    assert r["tiny_logprobs_max_abs_diff"] <= LOGPROB_TOL_TINY, r["tiny_logprobs_max_abs_diff"]
    assert r["tiny_ref_logprobs_max_abs_diff"] <= LOGPROB_TOL_TINY, r["tiny_ref_logprobs_max_abs_diff"]
    assert r["logprobs_pad_is_zero"]


def assert_roundtrip(r: dict) -> None:
    assert r["roundtrip_same_names"], "exported HF folder has other tensor names than the original"
    assert r["roundtrip_max_abs_diff"] == 0.0, r["roundtrip_max_abs_diff"]
    assert r["roundtrip_logits_max_abs_diff"] == 0.0, r["roundtrip_logits_max_abs_diff"]
    assert r["roundtrip_has_tokenizer"]


def assert_export_after_training(r: dict) -> None:
    assert r["export_after_training_vs_megatron_max_abs_diff"] <= LOGPROB_TOL_TINY
    assert r["engine_weights_cover_export"]
    assert r["engine_weights_vs_export_max_abs_diff"] == 0.0


def assert_resume(r: dict) -> None:
    assert r["resumed_steps_done"] == 1
    # Same layout: restoring model + optimizer + step must reproduce the run bit for bit.
    assert r["resumed_trajectory"] == r["trajectory"][1:]
    assert r["resumed_logprobs_max_abs_diff"] == 0.0


def assert_all(res: dict, layout: str) -> None:
    r = res[layout]
    assert_logprobs(r)
    assert_steps_close(r["trajectory"], res["hf_trajectory"])
    assert_roundtrip(r)
    assert_export_after_training(r)
    assert_resume(r)
    if "smol_logprobs_max_abs_diff" in r:
        assert r["smol_logprobs_max_abs_diff"] <= LOGPROB_TOL_SMOL
