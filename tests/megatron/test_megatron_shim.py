"""The test-only CUDA shim: fails loudly when megatron starts using a CUDA API it does not
cover, and stays out of package code."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from tests.megatron.launching import megatron_installed

ROOT = Path(__file__).resolve().parents[2]


def test_megatron_uses_no_unshimmed_cuda_api(cpu_results):
    """Every torch.cuda name megatron code read during the CPU runs is replaced or known harmless."""
    uses = {tuple(u) for layout in ("tp2", "pp2", "dp2", "tp1") for u in cpu_results[layout]["unshimmed_cuda_uses"]}
    assert not uses, (
        "megatron now reads torch.cuda names the CPU shim does not cover; add them to "
        "tests/megatron/cpu_shim.py (CUDA_REPLACEMENTS, or SAFE_AS_IS if harmless):\n"
        + "\n".join(f"  torch.cuda.{n} at {where}" for n, where in sorted(uses))
    )


def test_audit_sees_megatron_cuda_reads():
    """The audit itself works: importing megatron.core under it records its torch.cuda reads."""
    if not megatron_installed():
        pytest.skip("megatron not installed")
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.megatron import cpu_shim\n"
        "cpu_shim.install(bridge=False)\n"
        "import megatron.core.tensor_parallel.random\n"
        "names = {n for n, _ in cpu_shim.AUDIT}\n"
        "assert names, 'audit recorded nothing'\n"
        "print(sorted(names))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"POP_SHIM_AUDIT": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_shim_written_for_installed_versions():
    if not megatron_installed():
        pytest.skip("megatron not installed")
    from tests.megatron.cpu_shim import SHIM_WRITTEN_FOR

    for dist, version in SHIM_WRITTEN_FOR.items():
        installed = importlib.metadata.version(dist)
        assert installed == version, (
            f"{dist} {installed} is installed but the CPU shim was verified against {version}: run "
            "`pytest tests/megatron` (the audit test lists new CUDA calls), fix the shim, then update SHIM_WRITTEN_FOR"
        )


def test_package_code_never_imports_test_shims():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "pop_nemo").rglob("*.py")
        if "cpu_shim" in p.read_text()
        and "tests/megatron/cpu_shim.py" not in p.read_text()
        or "from tests" in p.read_text()
        or "import tests" in p.read_text()
    ]
    assert not offenders, offenders
    code = (
        "import sys, pop_nemo.policies.megatron, pop_nemo.build, pop_nemo.launch\n"
        "bad = [m for m in sys.modules if m.startswith(('tests', 'transformer_engine'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_megatron_policy_refuses_cpu_without_shim():
    code = (
        "import torch\n"
        "from pop_nemo.policies.megatron import MegatronPolicy\n"
        "try:\n"
        "    MegatronPolicy('x', lr=1e-5, total_steps=1)\n"
        "except RuntimeError as e:\n"
        "    assert 'needs CUDA' in str(e), e\n"
        "    print('refused')\n"
    )
    if __import__("torch").cuda.is_available():
        pytest.skip("has CUDA")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "refused" in proc.stdout, proc.stderr[-2000:]
