"""TensorRT-LLM engine, the parts that run without a GPU: request building (tokens, sampling,
guides) and the Qwen2 weight mapping used to refit it. The engine itself needs TensorRT-LLM and
a GPU (``@pytest.mark.gpu`` below; the support table in docs/CLUSTER.md says what ran)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import xgrammar as xgr

from pop_nemo.engines import qwen2_weights as qw
from pop_nemo.engines import trtllm
from pop_nemo.engines.base import Guide, Request, Sampling
from tests.conftest import ROOT

SHAPES = [
    qw.Qwen2Shape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96),
    qw.Qwen2Shape(2, 48, 6, 1, 80, head_dim=16, tie_word_embeddings=True),  # MQA, head_dim != H/heads
    qw.Qwen2Shape(1, 32, 4, 4, 40, qkv_bias=False),  # MHA, Llama-style (no biases)
]


def random_hf_state(shape: qw.Qwen2Shape, vocab: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, d, kv = shape.hidden_size, shape.d, shape.num_kv_heads * shape.d
    sizes = {
        "q_proj.weight": (shape.num_heads * d, h),
        "k_proj.weight": (kv, h),
        "v_proj.weight": (kv, h),
        "q_proj.bias": (shape.num_heads * d,),
        "k_proj.bias": (kv,),
        "v_proj.bias": (kv,),
        "o_proj.weight": (h, shape.num_heads * d),
        "gate_proj.weight": (shape.intermediate_size, h),
        "up_proj.weight": (shape.intermediate_size, h),
        "down_proj.weight": (h, shape.intermediate_size),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    out = {}
    for name in qw.hf_names(shape):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            size = (vocab, h)
        elif name == "model.norm.weight":
            size = (h,)
        else:  # model.layers.N.[self_attn.|mlp.]<key>
            rest = name.split(".", 3)[3]
            size = sizes[rest.split(".", 1)[1] if rest.startswith(("self_attn.", "mlp.")) else rest]
        out[name] = torch.randn(size, generator=g)
    return out


# ------------------------------------------------------------------ weight mapping


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("te", [True, False])
def test_megatron_hf_round_trip_is_exact(shape, te):
    hf = random_hf_state(shape)
    meg = qw.hf_to_megatron(hf, shape, te_layernorm_names=te)
    assert qw.is_megatron_state(meg) and not qw.is_megatron_state(hf)
    back = qw.megatron_to_hf({f"module.module.{k}": v for k, v in meg.items()}, shape)  # DDP wrappers
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_fused_qkv_layout_is_megatrons_per_group_interleave(shape):
    """megatron-core's SelfAttention views linear_qkv's output as [groups, (heads/group + 2)·d]
    and splits it into the group's queries, then its key, then its value. Reproduce that split
    on the fused projection and compare with HF's separate q/k/v projections."""
    hf = random_hf_state(shape, seed=1)
    meg = qw.hf_to_megatron(hf, shape)
    x = torch.randn(3, shape.hidden_size)
    fused = x @ meg["decoder.layers.1.self_attention.linear_qkv.weight"].T
    fused = fused + meg["decoder.layers.1.self_attention.linear_qkv.bias"]
    g, hpg, d = shape.num_kv_heads, shape.heads_per_group, shape.d
    per_group = fused.view(3, g, (hpg + 2) * d)
    q, k, v = torch.split(per_group, [hpg * d, d, d], dim=-1)
    p = "model.layers.1.self_attn."
    assert torch.allclose(q.reshape(3, -1), x @ hf[p + "q_proj.weight"].T + hf[p + "q_proj.bias"], atol=1e-5)
    assert torch.allclose(k.reshape(3, -1), x @ hf[p + "k_proj.weight"].T + hf[p + "k_proj.bias"], atol=1e-5)
    assert torch.allclose(v.reshape(3, -1), x @ hf[p + "v_proj.weight"].T + hf[p + "v_proj.bias"], atol=1e-5)
    # fc1 is [gate; up]
    fc1 = meg["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[: shape.intermediate_size], hf["model.layers.1.mlp.gate_proj.weight"])


def test_names_map_and_unknowns_fail():
    assert qw.megatron_to_hf_names("decoder.layers.7.mlp.linear_fc2.weight") == ["model.layers.7.mlp.down_proj.weight"]
    assert qw.megatron_to_hf_names("decoder.layers.0.self_attention.linear_qkv.bias") == [
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.v_proj.bias",
    ]
    assert qw.megatron_to_hf_names("decoder.layers.0.self_attention.linear_proj._extra_state") == []
    with pytest.raises(KeyError):
        qw.megatron_to_hf_names("decoder.layers.0.mlp.router.weight")


def test_incomplete_or_foreign_weights_are_refused():
    shape = SHAPES[0]
    hf = random_hf_state(shape)
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing.*up_proj"):
        qw.check_complete(hf, shape)
    meg = qw.hf_to_megatron(random_hf_state(shape), shape)
    meg["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.zeros(5, shape.hidden_size)
    with pytest.raises(ValueError, match="linear_qkv has 5 rows"):
        qw.megatron_to_hf(meg, shape)


def test_shape_from_hf_config(tmp_path):
    from tests.megatron.tiny import make_tiny_qwen2

    folder = make_tiny_qwen2(tmp_path / "q")
    cfg = json.loads((folder / "config.json").read_text())
    shape = qw.Qwen2Shape.from_hf_config(cfg)
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.qkv_bias) == (2, 4, 2, True)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    qw.check_complete(model.state_dict().keys(), shape)  # exactly the parameters HF builds
    # What a policy hands over: a module, an HF state dict, or Megatron names, all → HF names.
    for source in (model, model.state_dict(), qw.hf_to_megatron(model.state_dict(), shape)):
        got = trtllm.hf_weights(source, cfg)
        assert got.keys() == set(qw.hf_names(shape))
        assert torch.equal(got["model.layers.1.self_attn.k_proj.bias"], model.model.layers[1].self_attn.k_proj.bias)


def test_refit_buckets_keep_fused_tensors_together():
    shape = SHAPES[0]
    hf = random_hf_state(shape)
    sizes = [(k, v.numel() * 4) for k, v in hf.items()]
    limit = 40_000
    groups = list(qw.buckets(sizes, limit))
    assert sorted(n for g in groups for n in g) == sorted(hf)
    where = {n: i for i, g in enumerate(groups) for n in g}
    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        assert len({where[p + f"self_attn.{x}_proj.{s}"] for x in "qkv" for s in ("weight", "bias")}) == 1
        assert where[p + "mlp.gate_proj.weight"] == where[p + "mlp.up_proj.weight"]
    size = dict(sizes)
    for g in groups:
        keys = {qw.fusion_key(n) for n in g}
        assert sum(size[n] for n in g) <= limit or len(keys) == 1  # only a lone oversize group exceeds


@pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is None, reason="megatron-bridge not installed")
def test_mapping_agrees_with_megatron_bridge_qwen2(tmp_path):
    """Megatron-Bridge's own Qwen2 registry and its QKV merge, run in a subprocess (importing the
    bridge on CPU needs the test-only shim, which must not leak into this process)."""
    shape = SHAPES[0]
    hf = random_hf_state(shape, seed=3)
    torch.save(hf, tmp_path / "hf.pt")
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from tests.megatron.cpu_shim import install
install(bridge=True)
from pop_nemo.compat import allow_megatron_bridge_import
allow_megatron_bridge_import()
from types import SimpleNamespace
from megatron.bridge.models.qwen.qwen2_bridge import Qwen2Bridge
from megatron.bridge.models.conversion.param_mapping import merge_qkv_weights, merge_qkv_biases
reg = Qwen2Bridge().mapping_registry()
names = [[m.megatron_param, m.hf_param] for m in reg.mappings]
cfg = SimpleNamespace(num_attention_heads={shape.num_heads}, num_query_groups={shape.num_kv_heads},
                      kv_channels={shape.d}, hidden_size={shape.hidden_size})
hf = torch.load({str(tmp_path / "hf.pt")!r})
p = "model.layers.1.self_attn."
torch.save({{"w": merge_qkv_weights(cfg, *(hf[p + x + "_proj.weight"] for x in "qkv")),
             "b": merge_qkv_biases(cfg, *(hf[p + x + "_proj.bias"] for x in "qkv"))}}, {str(tmp_path / "qkv.pt")!r})
print("NAMES" + json.dumps(names))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = json.loads(proc.stdout.split("NAMES", 1)[1])
    assert len(names) >= 10
    for megatron, hf_names in names:
        want = list(hf_names.values()) if isinstance(hf_names, dict) else [hf_names]
        assert qw.megatron_to_hf_names(megatron.replace("*", "3")) == [w.replace("*", "3") for w in want]
    ref = torch.load(tmp_path / "qkv.pt")
    meg = qw.hf_to_megatron(hf, shape)
    assert torch.equal(meg["decoder.layers.1.self_attention.linear_qkv.weight"], ref["w"])
    assert torch.equal(meg["decoder.layers.1.self_attention.linear_qkv.bias"], ref["b"])


# ------------------------------------------------------------------ request building


def test_module_imports_without_tensorrt_llm():
    assert "tensorrt_llm" not in sys.modules
    if trtllm.tensorrt_llm_available():
        pytest.skip("TensorRT-LLM is installed here")
    with pytest.raises(trtllm.TRTLLMUnavailable, match="NGC image"):
        trtllm.TRTLLMEngine(str(ROOT), tokenizer=None)


def test_sampling_fields_follow_the_llm_api_rules():
    stop = [2, 7]
    kw, copies = trtllm.sampling_fields(Sampling(0.8, 0.9, 64, n=4, seed=2**64 + 5), stop, pad_id=0)
    assert copies == 1
    assert kw == {
        "max_tokens": 64,
        "end_id": 2,
        "pad_id": 0,
        "stop_token_ids": [2, 7],
        "detokenize": True,
        "skip_special_tokens": True,
        "logprobs": 1,
        "top_k": 0,
        "top_p": 0.9,
        "temperature": 0.8,
        "n": 4,
        "seed": (2**64 + 5) % 2**63,
    }
    # Greedy: top_k=1 (temperature must be > 0 or unset in TRT-LLM); n>1 goes out as n requests.
    kw, copies = trtllm.sampling_fields(Sampling(0.0, 1.0, 16, n=3), stop, pad_id=0, logprobs=False)
    assert copies == 3 and kw["n"] == 1 and kw["top_k"] == 1 and kw["temperature"] is None
    assert "logprobs" not in kw and "seed" not in kw


def test_plan_requests_tokens_and_guides(tokenizer, engine):
    schema = json.dumps({"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]})
    reqs = [
        Request(
            [{"role": "user", "content": "Rate it."}], Sampling(0.0, 1.0, 32, n=2, guide=Guide("json_schema", schema))
        ),
        Request([{"role": "user", "content": "Write."}], Sampling(1.0, 0.95, 48, n=3, seed=11)),
        Request([{"role": "user", "content": "Yes?"}], Sampling(0.0, 1.0, 8, guide=Guide("regex", "(yes|no)"))),
    ]
    plan = trtllm.plan_requests(reqs, engine.encode, engine.eos_ids, engine.pad_id)
    assert [(p.request, p.first_sample, p.sampling["n"]) for p in plan] == [(0, 0, 1), (0, 1, 1), (1, 0, 3), (2, 0, 1)]
    for p in plan:  # exactly the HF engine's prompt tokens (the chat template, no extra BOS)
        assert p.prompt_ids == engine.encode(reqs[p.request])
    assert plan[2].guide == {} and plan[3].guide == {"regex": "(yes|no)"}
    # The JSON schema travels as EBNF compiled with the HF engine's options: same language.
    ebnf = plan[0].guide["grammar"]
    assert plan[1].guide is plan[0].guide
    info = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=engine.grammars.info.vocab_size, stop_token_ids=engine.eos_ids
    )
    compiled = xgr.GrammarCompiler(info).compile_grammar(ebnf)
    hf_grammar = engine.grammars.compile(reqs[0].sampling.guide)
    for text, ok in [('{"score":3}', True), ('{"score": 3}', False), ('{"score":"3"}', False)]:
        for g in (compiled, hf_grammar):
            m = xgr.GrammarMatcher(g)
            accepted = all(m.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
            assert (accepted and m.accept_token(engine.eos_ids[0])) == ok, (text, ok)


def test_completion_from_output_both_logprob_forms():
    lp = SimpleNamespace
    dict_form = SimpleNamespace(
        text="hi",
        token_ids=[5, 9, 2],
        finish_reason="stop",
        logprobs=[
            {5: lp(logprob=-0.5, rank=1)},
            {9: lp(logprob=-1.25, rank=2), 4: lp(logprob=-0.1, rank=1)},
            {2: lp(logprob=-0.01, rank=1)},
        ],
    )
    c = trtllm.completion_from_output(dict_form, [1, 2, 3], stop_ids=[2])
    assert (c.text, c.token_ids, c.logprobs, c.prompt_ids, c.finish_reason) == (
        "hi",
        [5, 9, 2],
        [-0.5, -1.25, -0.01],
        [1, 2, 3],
        "stop",
    )
    floats = SimpleNamespace(text="abc", token_ids=[5, 6], logprobs=[-0.2, -0.3], finish_reason="length")
    c = trtllm.completion_from_output(floats, [1], stop_ids=[2])
    assert c.logprobs == [-0.2, -0.3] and c.finish_reason == "length"


@pytest.mark.gpu
@pytest.mark.skipif(not trtllm.tensorrt_llm_available(), reason="needs TensorRT-LLM (the NGC image)")
def test_trtllm_generate_guided_and_refit_on_gpu(tmp_path, model_path, tokenizer):
    """On a GPU with TensorRT-LLM: sampling with n and seeds, a JSON guide that parses, and a refit
    to zeroed-then-restored weights that changes and restores the greedy output."""
    eng = trtllm.TRTLLMEngine(model_path, tokenizer, kv_cache_fraction=0.2, export_dir=str(tmp_path))
    req = Request([{"role": "user", "content": "Name a colour."}], Sampling(0.0, 1.0, 16))
    before = eng.generate([req])[0][0]
    outs = eng.generate([Request(req.messages, Sampling(1.0, 1.0, 16, n=4, seed=3))])[0]
    assert len(outs) == 4 and all(o.token_ids for o in outs)
    schema = json.dumps({"type": "object", "properties": {"c": {"type": "string", "maxLength": 8}}, "required": ["c"]})
    guided = eng.generate([Request(req.messages, Sampling(0.0, 1.0, 64, guide=Guide("json_schema", schema)))])[0][0]
    assert "c" in json.loads(guided.text)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    eng.update_weights(model)  # same weights: same greedy answer
    assert eng.stats["refit_s"] is not None and eng.generate([req])[0][0].token_ids == before.token_ids
    eng.shutdown()


def test_reload_fallback_writes_a_loadable_hf_folder(tmp_path):
    """The refit fallback: the weights as an HF folder next to the base model's config and
    tokenizer, which transformers (and so TRT-LLM's HF loader) reads back exactly."""
    from transformers import AutoModelForCausalLM

    from tests.megatron.tiny import make_tiny_qwen2

    base = make_tiny_qwen2(tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    trained = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        trained.model.layers[0].mlp.up_proj.weight.add_(1.0)
    meg = qw.hf_to_megatron(trained.state_dict(), qw.Qwen2Shape.from_hf_config(cfg))
    out = trtllm.write_hf_folder(trtllm.hf_weights(meg, cfg), str(base), tmp_path / "export" / "refit")
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(out)
    for k, v in trained.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
