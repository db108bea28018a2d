"""pop_nemo.compat and the grammar vocabulary: what differs between the development line
(transformers 5, xgrammar 0.2) and the image's (transformers 4.57.1, xgrammar 0.1.25). These run
in both test tiers (README), so each line checks its own side."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicLayer

from pop_nemo import compat
from pop_nemo.engines.grammar import tokenizer_info


def test_cache_layer_initialises_with_this_transformers():
    layer = DynamicLayer()
    k = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    compat.init_cache_layer(layer, k, k.clone())
    assert layer.is_initialized and layer.dtype == torch.float64 and layer.keys.numel() == 0


def test_grammar_vocabulary_is_byte_level_as_the_tokenizer_encodes(tokenizer):
    import xgrammar as xgr

    info = tokenizer_info(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL
    ids = tokenizer.encode("<answer> is the dose", add_special_tokens=False)
    assert b"".join(info.decoded_vocab[i] for i in ids) == b"<answer> is the dose"


def test_converted_model_folder_is_per_transformers_major():
    from pop_nemo.models import cache_dir, converted_dir

    major = int(transformers.__version__.split(".")[0])
    suffix = "" if major == 5 else f"-transformers{major}"
    assert converted_dir() == cache_dir() / f"smollm2-135m-instruct{suffix}"


@pytest.mark.skipif(compat.TRANSFORMERS_MAJOR >= 5, reason="the image's line only (transformers 4.57)")
def test_bridge_import_placeholders_on_transformers_4(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    compat.allow_megatron_bridge_import()
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM

    with pytest.raises(RuntimeError, match=r"the gemma4 model family needs transformers >= 5 \(this is 4\.57"):
        Gemma4ForCausalLM()
    assert transformers.PreTrainedConfig is transformers.PretrainedConfig
    # a family transformers really has is the real module, not a placeholder
    assert not hasattr(importlib.import_module("transformers.models.llama"), "__pop_nemo_placeholder__")


@pytest.mark.skipif(compat.TRANSFORMERS_MAJOR < 5, reason="the development line only (transformers 5)")
def test_bridge_import_is_left_alone_on_transformers_5(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    compat.allow_megatron_bridge_import()
    assert importlib.util.find_spec("transformers.models.no_such_family_xyz") is None
    assert not any(isinstance(f, compat._PlaceholderFinder) for f in sys.meta_path)
