"""The differences between the two package lines pop_nemo runs on, in one place.

The development line is transformers 5 (pyproject.toml); the container's is TensorRT-LLM 1.2.1's
transformers 4.57.1 (containers/image-pins.txt, docs/DESIGN.md §7). Each shim here names the
fact it bridges, so it can go when the image moves to transformers 5.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from functools import cache

import transformers

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# What Megatron-Bridge 0.6.2 imports from transformers when `megatron.bridge` is imported (its
# registry imports every model family it supports) and transformers 4.57 does not have: model
# packages, and top-level model classes.
BRIDGE_MODELS_NEWER_THAN_4_57 = ("ernie4_5_vl_moe", "exaone4_5", "gemma4", "qwen3_5", "qwen3_5_moe")
BRIDGE_CLASSES_NEWER_THAN_4_57 = ("Exaone4_5_ForConditionalGeneration", "ExaoneMoeForCausalLM", "GlmMoeDsaForCausalLM")


def init_cache_layer(layer, key_states, value_states) -> None:
    """``DynamicLayer.lazy_initialization``: (keys, values) in transformers 5, (keys) in 4.57."""
    if _lazy_init_takes_values(type(layer)):
        layer.lazy_initialization(key_states, value_states)
    else:
        layer.lazy_initialization(key_states)


@cache
def _lazy_init_takes_values(cls) -> bool:
    return "value_states" in inspect.signature(cls.lazy_initialization).parameters


class _NeedsNewerTransformers:
    """Stands in for a class of a model family this transformers lacks; using it says so."""

    family = ""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"the {self.family} model family needs transformers >= 5 (this is {transformers.__version__}); "
            "pop_nemo's Megatron path supports Llama- and Qwen2-style models on transformers 4.57"
        )


def _placeholder_module(name: str, family: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so `from transformers.models.X.modeling_X import Y` resolves
    mod.__pop_nemo_placeholder__ = True

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        cls = type(attr, (_NeedsNewerTransformers,), {"family": family})
        setattr(mod, attr, cls)
        return cls

    mod.__getattr__ = __getattr__
    return mod


class _PlaceholderFinder:
    """Finds ``transformers.models.<family>[.*]`` for the families above, when transformers lacks them."""

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 3 or parts[:2] != ["transformers", "models"] or parts[2] not in BRIDGE_MODELS_NEWER_THAN_4_57:
            return None
        return importlib.util.spec_from_loader(fullname, _PlaceholderLoader(parts[2]))


class _PlaceholderLoader:
    def __init__(self, family: str):
        self.family = family

    def create_module(self, spec):
        return _placeholder_module(spec.name, self.family)

    def exec_module(self, module):
        pass


def allow_megatron_bridge_import() -> None:
    """Let ``import megatron.bridge`` (0.6.2) work on transformers 4.57 (the image's).

    Bridge imports every model family it supports at import time, five of them newer than 4.57.
    pop_nemo converts Llama- and Qwen2-style models only; those families get placeholder modules,
    whose classes raise a clear error if anything ever uses them. A no-op on transformers 5.
    """
    if TRANSFORMERS_MAJOR >= 5 or any(isinstance(f, _PlaceholderFinder) for f in sys.meta_path):
        return
    sys.meta_path.append(_PlaceholderFinder())  # last: a real module, if there is one, wins
    if not hasattr(transformers, "PreTrainedConfig"):  # transformers 5's name for PretrainedConfig
        transformers.PreTrainedConfig = transformers.PretrainedConfig
    for name in BRIDGE_CLASSES_NEWER_THAN_4_57:
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (_NeedsNewerTransformers,), {"family": name}))
