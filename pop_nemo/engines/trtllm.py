"""The Engine protocol over TensorRT-LLM's LLM API (PyTorch backend), for rollouts on GPUs.

``tensorrt_llm`` is imported only when an engine is built, so this module imports (and its
request building and weight mapping are tested) on machines without it. Everything that needs
a GPU is marked as such in ``docs/CLUSTER.md``'s support table.

* **Requests.** Each :class:`~pop_nemo.engines.base.Request` is tokenized here with the model's
  chat template (so ``Completion.prompt_ids`` is exactly what the engine saw) and becomes one
  TRT-LLM request with its own ``SamplingParams``: ``n``, ``seed``, ``max_tokens``, stop ids and
  ``logprobs=1``. Temperature 0 is greedy (``top_k=1``; the LLM API refuses ``n > 1`` greedy
  requests, so those are sent as ``n`` identical single requests). Sampling sets ``top_k=0``
  and ``top_p`` explicitly: with both unset the LLM API treats a request as greedy.
* **Guides** go to TRT-LLM's xgrammar backend as ``GuidedDecodingParams``. A JSON-schema guide
  is converted to EBNF here with the *same* xgrammar options the HF engine compiles it with
  (no free whitespace, compact separators), so both engines accept exactly the same strings.
* **Refit** (``update_weights``) takes what a policy's ``engine_weights()`` returns: an HF
  state dict (Megatron-Bridge already mapped names), a Megatron state dict (mapped here by
  :mod:`pop_nemo.engines.qwen2_weights`), an ``nn.Module``, or the path of an exported HF
  folder. In-place refit sends CUDA IPC handles, bucketed so that fused tensors (q/k/v,
  gate/up) travel together, through the worker extension's ``update_weights`` RPC
  (``tensorrt_llm.llmapi.rlhf_utils.WorkerExtension``), then finalizes. When that is not
  available (or ``refit='reload'``), the weights are written as an HF folder and the LLM is
  rebuilt from it. Seconds and the method are in ``stats`` (``refit_s``, ``refit_method``).
* **Sleep/wake** release and re-materialize tagged GPU memory (default: the KV cache) while a
  colocated trainer runs; the LLM must be built with ``enable_sleep=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pop_nemo.checkpoint import atomic_dir
from pop_nemo.engines.base import Completion, Guide, Request, Sampling
from pop_nemo.engines.grammar import JSON_SEPARATORS

WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
_MAX_SEED = 2**63


class TRTLLMUnavailable(RuntimeError):
    pass


def tensorrt_llm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_llm") is not None


# ------------------------------------------------------------------ request building (pure)


def json_schema_to_ebnf(spec: str) -> str:
    """The EBNF of a JSON-schema guide, compiled with the HF engine's xgrammar options."""
    import xgrammar as xgr

    return str(xgr.Grammar.from_json_schema(spec, any_whitespace=False, separators=JSON_SEPARATORS))


def guided_fields(guide: Guide | None, json_as: Literal["ebnf", "json"] = "ebnf") -> dict[str, str]:
    """Keyword arguments of ``tensorrt_llm.sampling_params.GuidedDecodingParams`` for ``guide``."""
    if guide is None:
        return {}
    if guide.kind == "json_schema":
        return {"grammar": json_schema_to_ebnf(guide.spec)} if json_as == "ebnf" else {"json": guide.spec}
    if guide.kind == "ebnf":
        return {"grammar": guide.spec}
    if guide.kind == "regex":
        return {"regex": guide.spec}
    raise ValueError(f"unknown guide kind {guide.kind!r}")


def sampling_fields(s: Sampling, stop_ids: Sequence[int], pad_id: int, logprobs: bool = True) -> tuple[dict, int]:
    """``SamplingParams`` keyword arguments for one request, and how many copies to send.

    Greedy requests with ``n > 1`` are sent as ``n`` copies with ``n=1`` (the LLM API refuses
    ``best_of > 1`` when greedy); their samples are identical by definition."""
    if s.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    kw: dict[str, Any] = {
        "max_tokens": s.max_new_tokens,
        "end_id": stop_ids[0],
        "pad_id": pad_id,
        "stop_token_ids": list(stop_ids),
        "detokenize": True,
        "skip_special_tokens": True,
    }
    if logprobs:
        kw["logprobs"] = 1
    copies = 1
    if s.temperature <= 0:
        kw.update(top_k=1, top_p=None, temperature=None, n=1)
        copies = s.n
    else:
        kw.update(top_k=0, top_p=s.top_p, temperature=s.temperature, n=s.n)
    if s.seed is not None:
        kw["seed"] = s.seed % _MAX_SEED
    return kw, copies


@dataclass
class Planned:
    """One TRT-LLM request: the prompt tokens, its sampling and guide kwargs, and where its
    outputs go (``request`` index, first sample slot)."""

    request: int
    first_sample: int
    prompt_ids: list[int]
    sampling: dict[str, Any]
    guide: dict[str, str] = field(default_factory=dict)


def plan_requests(
    requests: Sequence[Request],
    encode,
    stop_ids: Sequence[int],
    pad_id: int,
    json_as: Literal["ebnf", "json"] = "ebnf",
    logprobs: bool = True,
) -> list[Planned]:
    """Turn pop_nemo requests into TRT-LLM requests (``encode(request) -> prompt ids``)."""
    planned: list[Planned] = []
    guides: dict[Guide, dict[str, str]] = {}
    for i, req in enumerate(requests):
        prompt = list(encode(req))
        kw, copies = sampling_fields(req.sampling, stop_ids, pad_id, logprobs)
        g = req.sampling.guide
        if g is not None and g not in guides:
            guides[g] = guided_fields(g, json_as)
        gf = guides[g] if g is not None else {}
        per = kw["n"]
        for c in range(copies):
            planned.append(Planned(i, c * per, prompt, dict(kw), gf))
    return planned


def completion_from_output(out: Any, prompt_ids: list[int], stop_ids: Sequence[int]) -> Completion:
    """A TRT-LLM ``CompletionOutput`` (``text``, ``token_ids``, ``logprobs``, ``finish_reason``)
    → :class:`Completion`. Logprobs come as floats or as ``{token_id: Logprob}`` per token."""
    ids = [int(t) for t in (out.token_ids or [])]
    lps: list[float] = []
    for i, entry in enumerate(out.logprobs or []):
        if isinstance(entry, Mapping):
            tok = ids[i] if i < len(ids) else None
            lp = entry.get(tok) if tok in entry else next(iter(entry.values()), None)
            lps.append(float(getattr(lp, "logprob", lp)) if lp is not None else float("nan"))
        else:
            lps.append(float(entry))
    reason = str(out.finish_reason or "")
    if reason == "length":
        finish = "length"
    elif reason in ("stop", "end_id", "stop_words") or (ids and ids[-1] in stop_ids):
        finish = "stop"
    else:
        finish = "length" if reason in ("", "None") else "stop"
    return Completion(
        text=out.text or "",
        token_ids=ids,
        logprobs=lps,
        prompt_ids=list(prompt_ids),
        finish_reason=finish,
        meta={"engine": "trtllm", "finish_reason_raw": reason},
    )


# ------------------------------------------------------------------ weights (pure but for torch)


def hf_weights(source: Any, hf_config: Mapping[str, Any]) -> dict:
    """Normalize what a policy hands over into an HF-named state dict (tensors where they are)."""
    from pop_nemo.engines import qwen2_weights as qw

    if hasattr(source, "state_dict") and callable(source.state_dict):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f"cannot refit from {type(source).__name__}; give a state dict, a module or a folder")
    shape = qw.Qwen2Shape.from_hf_config(hf_config)
    if qw.is_megatron_state(source):
        return qw.megatron_to_hf(source, shape)
    out = {qw.strip_wrappers(k): v for k, v in source.items()}
    if shape.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    qw.check_complete(out, shape)
    return out


def write_hf_folder(weights: Mapping[str, Any], base_model: str, out: Path) -> Path:
    """An HF folder with ``weights`` and ``base_model``'s config/tokenizer files (for a reload)."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_dir(out, ".refit-") as tmp:
        for f in Path(base_model).iterdir():
            if (
                f.is_file()
                and not f.name.endswith((".safetensors", ".bin"))
                and f.name != "model.safetensors.index.json"
            ):
                shutil.copy2(f, tmp / f.name)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    return out


# ------------------------------------------------------------------ the engine (GPU)


class TRTLLMEngine:
    """Rollouts on TensorRT-LLM. ``model_path`` is an HF folder (the engine is built from it)."""

    def __init__(
        self,
        model_path: str,
        tokenizer,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_batch_size: int | None = None,
        max_seq_len: int | None = None,
        max_num_tokens: int | None = None,
        kv_cache_fraction: float = 0.5,
        enable_sleep: bool = False,
        sleep_tags: Sequence[str] = ("kv_cache",),
        refit: Literal["auto", "ipc", "reload"] = "auto",
        orchestrator: Literal["ray", "mpi"] = "ray",
        refit_bucket_mb: int = 1024,
        export_dir: str | None = None,
        json_guides: Literal["ebnf", "json"] = "ebnf",
        extra_llm_args: Mapping[str, Any] | None = None,
    ):
        if not tensorrt_llm_available():
            raise TRTLLMUnavailable(
                "rollout.backend=trtllm needs TensorRT-LLM, which ships in the NGC image built by "
                "containers/Dockerfile (it is not installable from PyPI); use rollout.backend=hf here"
            )
        self.model_path = str(model_path)
        self.tokenizer = tokenizer
        self.hf_config = json.loads((Path(model_path) / "config.json").read_text())
        eos = {tokenizer.eos_token_id}
        gen_cfg = Path(model_path) / "generation_config.json"
        if gen_cfg.is_file():
            g = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos.update(g if isinstance(g, list) else [g])
        self.stop_ids = sorted(e for e in eos if e is not None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.json_guides = json_guides
        self.refit_mode = refit
        self.bucket_bytes = refit_bucket_mb * 2**20
        self.sleep_tags = list(sleep_tags)
        self.tensor_parallel_size = tensor_parallel_size
        self.asleep = False
        self.export_dir = Path(export_dir) if export_dir else Path(tempfile.mkdtemp(prefix="pop_nemo_trtllm_"))
        self._llm_args: dict[str, Any] = {
            "backend": "pytorch",
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "guided_decoding_backend": "xgrammar",
            "enable_sleep": enable_sleep,
            # ray: workers carry the RLHF extension (in-place refit, sleep/wake); mpi: TRT-LLM's default
            **(
                {"orchestrator_type": "ray", "ray_worker_extension_cls": WORKER_EXTENSION}
                if orchestrator == "ray"
                else {}
            ),
            **{
                k: v
                for k, v in (
                    ("max_batch_size", max_batch_size),
                    ("max_seq_len", max_seq_len),
                    ("max_num_tokens", max_num_tokens),
                )
                if v is not None
            },
            **dict(extra_llm_args or {}),
        }
        self._kv_fraction = kv_cache_fraction
        self.stats: dict[str, Any] = {
            "generated_tokens": 0,
            "prompt_tokens": 0,
            "calls": 0,
            "refit_s": None,
            "refit_method": None,
            "refits": 0,
        }
        self.llm = self._build(self.model_path)

    def _build(self, path: str):
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        kv = KvCacheConfig(free_gpu_memory_fraction=self._kv_fraction, enable_block_reuse=False)
        return LLM(model=path, tokenizer=path, kv_cache_config=kv, **self._llm_args)

    def encode(self, request: Request) -> list[int]:
        out = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        from tensorrt_llm import SamplingParams
        from tensorrt_llm.sampling_params import GuidedDecodingParams

        if self.asleep:
            raise RuntimeError("the TensorRT-LLM engine is asleep; call wake() before generate()")
        plan = plan_requests(requests, self.encode, self.stop_ids, self.pad_id, self.json_guides)
        params = [
            SamplingParams(**p.sampling, guided_decoding=GuidedDecodingParams(**p.guide) if p.guide else None)
            for p in plan
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p.prompt_ids} for p in plan], params, use_tqdm=False)
        results: list[list[Completion | None]] = [[None] * r.sampling.n for r in requests]
        for p, res in zip(plan, outputs):
            for k, o in enumerate(sorted(res.outputs, key=lambda o: o.index)):
                c = completion_from_output(o, p.prompt_ids, self.stop_ids)
                results[p.request][p.first_sample + k] = c
                self.stats["generated_tokens"] += len(c.token_ids)
                self.stats["prompt_tokens"] += len(p.prompt_ids)
        self.stats["calls"] += 1
        return [[c for c in rs if c is not None] for rs in results]

    # -------------------------------------------------------------- refit

    def update_weights(self, source: Any) -> None:
        """Refit from trained weights; see the module docstring. Records ``stats['refit_s']``."""
        t0 = time.perf_counter()
        if isinstance(source, (str, os.PathLike)):
            self._reload(str(source))
            method = "reload"
        else:
            weights = hf_weights(source, self.hf_config)
            method = self.refit_mode if self.refit_mode != "auto" else "ipc"
            if method == "ipc":
                try:
                    self._refit_ipc(weights)
                except (AttributeError, NotImplementedError) as e:  # no RPC / no worker extension
                    if self.refit_mode == "ipc":
                        raise
                    self.stats["refit_fallback_reason"] = f"{type(e).__name__}: {e}"
                    method = "reload"
            if method == "reload":
                folder = write_hf_folder(weights, self.model_path, self.export_dir / "refit")
                self._reload(str(folder))
        self.stats.update(refit_s=time.perf_counter() - t0, refit_method=method, refits=self.stats["refits"] + 1)

    def _rpc(self, method: str, *args):
        rpc = getattr(self.llm, "_collective_rpc", None) or getattr(self.llm, "collective_rpc", None)
        if rpc is None:
            raise NotImplementedError("this TensorRT-LLM build has no collective RPC on LLM")
        return rpc(method, args)

    def _refit_ipc(self, weights: Mapping[str, Any]) -> None:
        import torch
        from tensorrt_llm._torch.utils import get_device_uuid
        from torch.multiprocessing.reductions import reduce_tensor

        from pop_nemo.engines.qwen2_weights import buckets

        device = torch.cuda.current_device()
        uuid = get_device_uuid(device)
        dtype = _torch_dtype(self.hf_config.get("torch_dtype") or self.hf_config.get("dtype"))
        sizes = [(k, v.numel() * v.element_size()) for k, v in weights.items()]
        for names in buckets(sizes, self.bucket_bytes):
            on_gpu = {n: weights[n].detach().to(device=device, dtype=dtype or weights[n].dtype) for n in names}
            self._rpc("update_weights", {uuid: [(n, reduce_tensor(t)) for n, t in on_gpu.items()]})
            del on_gpu
        self._rpc("update_weights", None)  # finalize: post-load hooks, reset the prefix cache
        torch.cuda.empty_cache()

    def _reload(self, folder: str) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.llm = self._build(folder)
        self.asleep = False

    # -------------------------------------------------------------- memory

    def sleep(self) -> None:
        if self.asleep or not self._llm_args.get("enable_sleep"):
            return
        self._memory_call("sleep")
        self.asleep = True

    def wake(self) -> None:
        if not self.asleep:
            return
        self._memory_call("wakeup")
        self.asleep = False

    def _memory_call(self, what: str) -> None:
        direct = getattr(self.llm, what, None)
        if callable(direct):
            direct(self.sleep_tags)
        else:
            self._rpc(what, self.sleep_tags)

    def shutdown(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def close(self) -> None:
        self.shutdown()

    @property
    def placement(self) -> str:
        return f"TensorRT-LLM on GPU (TP={self.tensor_parallel_size})"


def _torch_dtype(name: Any):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(str(name))
