"""Test-only: run megatron-core and Megatron-Bridge on a machine without CUDA.

megatron-core 0.19 hard-codes CUDA in places that a CPU run goes through (``device="cuda"``
literals in the pipeline schedules, ``torch.cuda.get_rng_state`` in the RNG tracker, CUDA
streams in the DDP buffers, a ``torch.cuda.FloatTensor`` type assert in gradient clipping), and
``import megatron.bridge`` imports ``transformer_engine`` at module level. This module maps
those to CPU and installs a placeholder ``transformer_engine`` whose classes refuse to be built.

It is imported by ``tests/megatron`` worker scripts only, before anything from megatron, and
never by package code. ``install()`` is idempotent. With ``POP_SHIM_AUDIT=1`` every
``torch.cuda.<name>`` that megatron code reads is recorded, so a self-test can fail loudly when
a megatron upgrade starts using a CUDA API this shim does not cover
(``test_shim.py::test_megatron_uses_no_unshimmed_cuda_api``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

SHIM_WRITTEN_FOR = {"megatron-core": "0.19.2", "megatron-bridge": "0.6.2"}
CPU = torch.device("cpu")

# torch.cuda names megatron reads that are harmless on a CPU build as they are (they answer
# "no CUDA" truthfully, or are only touched behind an is_available() check).
SAFE_AS_IS = frozenset(
    {
        "is_available",
        "is_initialized",
        "device_count",
        "nvtx",
        "_lazy_init",
        "_lazy_call",
        "random",
        "amp",
        "graphs",
        # Class objects read at import time for type tuples and annotations, never instantiated
        # on the CPU path (module.py's _FLOAT_TYPES, FSDP/NVSHMEM helpers, random.py's imports).
        "FloatTensor",
        "HalfTensor",
        "BFloat16Tensor",
        "ExternalStream",
        "MemPool",
        "device",
    }
)


class _NullStream:
    """A stand-in for ``torch.cuda.Stream``: CPU work is ordered already."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


# What the shim puts on torch.cuda. Keys are also the audit's "covered" set.
CUDA_REPLACEMENTS = {
    "current_device": lambda: CPU,
    "synchronize": lambda device=None: None,
    "empty_cache": lambda: None,
    "get_rng_state": lambda device="cuda": torch.get_rng_state(),
    "set_rng_state": lambda new_state, device="cuda": torch.set_rng_state(new_state),
    "manual_seed": _cpu_manual_seed,
    "manual_seed_all": _cpu_manual_seed,
    "Stream": _NullStream,
    "Event": _NullEvent,
    "current_stream": lambda device=None: _NullStream(),
    "default_stream": lambda device=None: _NullStream(),
    "stream": lambda stream=None: contextlib.nullcontext(),
    "memory_allocated": lambda device=None: 0,
    "max_memory_allocated": lambda device=None: 0,
    "reset_peak_memory_stats": lambda device=None: None,
}


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)  # a bare index means cuda:N


class CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placement to CPU: ``device="cuda"`` in factories, ``.cuda()``, ``.to("cuda")``;
    and makes ``Tensor.type()`` report ``torch.cuda.*`` (megatron's clip asserts that name)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], CPU, *args[2:])
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str):
            return out.replace("torch.", "torch.cuda.", 1) if ".cuda." not in out else out
        return out


class _AuditedCuda(types.ModuleType):
    """``torch.cuda`` with attribute reads from megatron code recorded (POP_SHIM_AUDIT=1)."""

    def __getattribute__(self, name):
        if not name.startswith("__"):
            frame = sys._getframe(1)
            mod = frame.f_globals.get("__name__", "")
            if mod.startswith("megatron"):
                AUDIT.add((name, f"{frame.f_code.co_filename}:{frame.f_lineno}"))
        return super().__getattribute__(name)


AUDIT: set[tuple[str, str]] = set()
_MODE: CudaToCpu | None = None


def install_te_placeholder() -> None:
    """A ``transformer_engine`` with the names Megatron-Bridge imports; building any of them fails.

    megatron-core must probe for TE first and see it missing (its local fallbacks are then
    used), so every megatron.core module that probes is imported before the placeholder goes in.
    """
    if "transformer_engine" in sys.modules:
        return
    import importlib
    import pkgutil

    import megatron.core

    for info in pkgutil.walk_packages(megatron.core.__path__, "megatron.core."):
        if info.name.startswith(("megatron.core.extensions.transformer_engine", "megatron.core.inference")):
            continue
        with contextlib.suppress(Exception):
            importlib.import_module(info.name)

    class Unavailable(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{type(self).__name__}: transformer_engine is a test placeholder here")

    te = types.ModuleType("transformer_engine")
    pt = types.ModuleType("transformer_engine.pytorch")
    ops = types.ModuleType("transformer_engine.pytorch.ops")
    te.__version__ = "0.0.0+pop-nemo-placeholder"
    te.__path__, pt.__path__ = [], []
    for name in (
        "Linear",
        "LayerNormLinear",
        "LayerNormMLP",
        "TransformerLayer",
        "LayerNorm",
        "RMSNorm",
        "DotProductAttention",
        "GroupedLinear",
    ):
        setattr(pt, name, type(name, (Unavailable,), {}))
    for name in (
        "Sequential",
        "Linear",
        "LayerNorm",
        "RMSNorm",
        "Quantize",
        "MakeExtraOutput",
        "Dropout",
        "ConstantScale",
        "AddExtraInput",
    ):
        setattr(ops, name, type(name, (Unavailable,), {}))
    pt.ops, te.pytorch = ops, pt
    sys.modules.update(
        {"transformer_engine": te, "transformer_engine.pytorch": pt, "transformer_engine.pytorch.ops": ops}
    )


def _patch_megatron_rng() -> None:
    import megatron.core.tensor_parallel.random as rng

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    rng._set_cuda_rng_state = set_state
    rng._get_cuda_rng_state = get_state


def install(bridge: bool = True) -> None:
    """Make megatron-core (and, with ``bridge``, Megatron-Bridge) importable and runnable on CPU."""
    global _MODE
    if torch.cuda.is_available():  # a real GPU: only Megatron-Bridge's TE import may need help
        import importlib.util

        if bridge and importlib.util.find_spec("transformer_engine") is None:
            install_te_placeholder()
        return
    if _MODE is not None:
        return
    for name, fn in CUDA_REPLACEMENTS.items():
        setattr(torch.cuda, name, fn)
    torch.cuda.random.get_rng_state = CUDA_REPLACEMENTS["get_rng_state"]
    torch.cuda.random.set_rng_state = CUDA_REPLACEMENTS["set_rng_state"]
    _MODE = CudaToCpu()
    _MODE.__enter__()  # process-wide, for the life of this (test) process
    if os.environ.get("POP_SHIM_AUDIT") == "1":
        torch.cuda.__class__ = _AuditedCuda
    import megatron.core  # noqa: F401  (triton is imported here; fails early when missing)

    _patch_megatron_rng()
    if bridge:
        install_te_placeholder()


def unshimmed_cuda_uses() -> list[tuple[str, str]]:
    """Megatron call sites (name, file:line) that read a torch.cuda name the shim neither replaces
    nor knows to be harmless. Empty when everything the run touched is covered."""
    return sorted((n, where) for n, where in AUDIT if n not in CUDA_REPLACEMENTS and n not in SAFE_AS_IS)
