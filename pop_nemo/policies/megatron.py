"""The Megatron policy: a megatron-core ``GPTModel`` with tensor, pipeline and data parallelism,
loaded from an HF checkpoint through Megatron-Bridge.

Same protocol and the same numerics as :class:`pop_nemo.policies.hf.HFPolicy`:

* ``logprobs[:, t] = log p(x_t | x_<t)``, column 0 and padding are 0, computed by megatron's
  vocab-parallel cross-entropy (the model is called with ``labels``; no rank holds full logits).
* ``train_step`` runs the caller's ``LossFn`` on each micro-batch through megatron's
  ``forward_backward_func`` (1F1B pipeline schedule when PP > 1). The loss function already
  divides by the *global* normalizer, so micro-batch and data-parallel gradients are summed,
  not averaged: ``calculate_per_token_loss`` is switched on (megatron then neither divides by
  the micro-batch count nor by the DP size) and the per-token rescale in
  ``finalize_model_grads`` is skipped. The result is the gradient HF gets from one big batch.
* Adam (torch AdamW semantics; weight decay on every parameter, as HFPolicy), gradient
  clipping and the grad norm from megatron's optimizer, and the LR schedule of
  :class:`~pop_nemo.policies.base.LRSchedule` (set on the param groups each step).
* The frozen reference is a second, unwrapped GPTModel with the initial weights.
* ``save``/``load`` use megatron's distributed checkpointing (``torch_dist``): model and
  optimizer as sharded tensors (a checkpoint can be resumed with another TP/PP layout),
  plus ``policy_state.json`` with the step count.
* ``export_hf`` writes an HF folder through the bridge (rank 0 writes, all ranks gather).

Batches are taken from global rank 0 (broadcast), split across data-parallel ranks in whole
groups of ``row_group`` rows (DPO: a chosen and its rejected row stay on one rank and in one
micro-batch), padded to whole micro-batches with rows whose loss mask is 0, and every rank gets
the full result back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pop_nemo.compat import allow_megatron_bridge_import
from pop_nemo.distributed import all_sum_metrics
from pop_nemo.policies.base import LossFn, LRSchedule, TokenBatch

_FUSIONS = (
    "gradient_accumulation_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
    "cross_entropy_loss_fusion",
)


def runs_here() -> bool:
    """megatron-core's hard-coded ``torch.cuda`` calls work in this process: CUDA is visible, or
    something maps those calls to the CPU (the test suite's shim). Probed by calling one, so
    package code names no shim."""
    if torch.cuda.is_available():
        return True
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):  # not compiled with CUDA / no driver
        return False
    return True


def stop_checkpoint_writer() -> None:
    """Shut down the process megatron's ``torch_dist`` checkpoint writer leaves behind.

    The first save starts a ``multiprocessing`` Manager (a ``spawn`` child, about 1 GB resident)
    for its results queue and keeps it in a module global. A normal interpreter exit shuts it
    down; a process that ends with ``os._exit`` or is killed leaves it running, orphaned. Call
    this before such an exit. A no-op when no checkpoint was saved."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    queue, filesystem_async._results_queue = filesystem_async._results_queue, None
    manager = getattr(queue, "_manager", None)  # multiprocessing's proxy keeps its manager here
    if manager is not None:
        manager.shutdown()


def te_available() -> bool:
    """True when megatron-core found a real Transformer Engine (and a GPU to run it)."""
    if not torch.cuda.is_available():
        return False
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:
        return False
    return bool(HAVE_TE)


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Undo what importing Megatron-Bridge does to the loggers: it imports ``megatron.training``,
    whose module-level ``logging.basicConfig(level=INFO)`` sends every library's INFO records to
    stdout on every rank (megatron's lists each gradient bucket's parameters, one line each)."""
    # Its import_utils logs every optional symbol it cannot import (Transformer Engine's, without
    # TE) at INFO with a traceback, through a handler of its own: keep warnings and errors only.
    probes = logging.getLogger("megatron.bridge.utils.import_utils")
    if _warnings_only not in probes.filters:
        probes.addFilter(_warnings_only)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    if not handlers:  # basicConfig leaves a root logger that has a handler alone
        root.addHandler(logging.NullHandler())
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


class MegatronPolicy:
    def __init__(
        self,
        model_path: str,
        tokenizer=None,
        *,
        lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        max_grad_norm: float = 1.0,
        micro_batch_size: int = 4,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        bf16: bool = False,
        sequence_parallel: bool = False,
        use_distributed_optimizer: bool | None = None,
        activation_recompute: bool = False,
        with_reference: bool = True,
        row_group: int = 1,
        seed: int = 1234,
    ):
        from pop_nemo.distributed import init_distributed

        if not runs_here():
            raise RuntimeError(
                "policy.backend=megatron needs CUDA: megatron-core hard-codes CUDA calls. On CPU it runs only "
                "inside the test suite, which maps them to CPU (tests/megatron/cpu_shim.py)"
            )
        init_distributed()
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        self.ps = ps
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        if micro_batch_size % row_group:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be a multiple of row_group={row_group}")
        self.micro_batch_size, self.row_group = micro_batch_size, row_group
        self.schedule = LRSchedule(lr, warmup_steps, total_steps, min_lr_ratio)
        self.steps_done = 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.device = self.device or torch.device("cpu")
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        world = dist.get_world_size()
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not a multiple of TP×PP = {tp}×{pp}")
        if ps.model_parallel_is_initialized():
            if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
                raise RuntimeError("megatron parallel state is initialised with another TP/PP layout")
        else:
            ps.initialize_model_parallel(tp, pp)
        # megatron seeds its RNG tracker through the CUDA generator; keep the caller's CPU RNG
        # (sampling in the loop) as it was.
        cpu_rng = torch.get_rng_state()
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        torch.set_rng_state(cpu_rng)

        self.params_dtype = torch.bfloat16 if bf16 else torch.float32
        self.bridge, provider = self._provider(tp, pp, bf16, sequence_parallel, activation_recompute)
        self.model = self._build(provider, train=True, use_distributed_optimizer=use_distributed_optimizer)
        self.reference = self._build(provider, train=False) if with_reference else None
        self._setup_optimizer(lr, weight_decay, betas, adam_eps, max_grad_norm, bf16, use_distributed_optimizer)

    # ------------------------------------------------------------------ construction

    def _provider(self, tp: int, pp: int, bf16: bool, sequence_parallel: bool, recompute: bool):
        allow_megatron_bridge_import()
        with _root_logging_kept():
            from megatron.bridge import AutoBridge
            from megatron.bridge.models.gpt_provider import local_layer_spec

        bridge = AutoBridge.from_hf_pretrained(self.model_path)
        p = bridge.to_megatron_provider(load_weights=True)
        p.tensor_model_parallel_size = tp
        p.pipeline_model_parallel_size = pp
        p.sequence_parallel = bool(sequence_parallel and tp > 1)
        p.bf16, p.fp16 = bf16, False
        p.params_dtype = self.params_dtype
        p.pipeline_dtype = self.params_dtype
        p.hidden_dropout = 0.0
        p.attention_dropout = 0.0
        # Gradients are summed over micro-batches and DP ranks; see the module docstring.
        p.calculate_per_token_loss = True
        if recompute:
            p.recompute_granularity, p.recompute_method, p.recompute_num_layers = "full", "uniform", 1
        if not te_available():
            p.transformer_layer_spec = local_layer_spec
            p.sequence_parallel = False  # torch LayerNorm fallback cannot do it
            for f in _FUSIONS:
                if hasattr(p, f):
                    setattr(p, f, False)
        p.finalize()
        return bridge, p

    def _build(self, provider, train: bool, use_distributed_optimizer: bool | None = None) -> list[torch.nn.Module]:
        from megatron.core.distributed import DistributedDataParallelConfig

        cpu = not torch.cuda.is_available()
        if not train:
            models = provider.provide_distributed_model(
                wrap_with_ddp=False, use_cpu_initialization=cpu, bf16=self.params_dtype == torch.bfloat16
            )
            for m in models:
                m.eval().requires_grad_(False)
            return models
        ddp = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self._dist_opt(use_distributed_optimizer),
            average_in_collective=False,
            check_for_nan_in_grad=False,
        )
        return provider.provide_distributed_model(
            ddp_config=ddp,
            wrap_with_ddp=True,
            use_cpu_initialization=cpu,
            bf16=self.params_dtype == torch.bfloat16,
        )

    @staticmethod
    def _dist_opt(flag: bool | None) -> bool:
        """Default: on with CUDA and Apex/TE's fused Adam. Off on CPU (it asserts CUDA tensors) and
        without Apex/TE: megatron-core 0.19.2's torch-AdamW fallback cannot load its own distributed
        optimizer checkpoint (KeyError 'step' in load_parameter_state_from_fully_reshardable;
        seen on an H100)."""
        if flag is not None:
            return bool(flag)
        if not torch.cuda.is_available():
            return False
        from megatron.core.optimizer import distrib_optimizer

        return bool(distrib_optimizer.HAVE_APEX_OR_TE)

    def _setup_optimizer(self, lr, weight_decay, betas, eps, max_grad_norm, bf16, use_distributed_optimizer) -> None:
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.utils import get_model_config

        cfg = OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=lr * self.schedule.min_lr_ratio,
            weight_decay=weight_decay,
            adam_beta1=betas[0],
            adam_beta2=betas[1],
            adam_eps=eps,
            clip_grad=max_grad_norm,
            bf16=bf16,
            params_dtype=self.params_dtype,
            use_distributed_optimizer=self._dist_opt(use_distributed_optimizer),
        )
        # {}: no parameter-group overrides, i.e. weight decay on biases and norms too (as HFPolicy).
        self.optimizer = get_megatron_optimizer(cfg, self.model, config_overrides={})
        mcfg = get_model_config(self.model[0])

        def finalize(model, num_tokens=None, *args, **kwargs):
            # The loss is already divided by the global normalizer: no per-token rescale here.
            return finalize_model_grads(model, None, *args, **kwargs)

        mcfg.finalize_model_grads_func = finalize
        mcfg.grad_scale_func = self.optimizer.scale_loss

    # ------------------------------------------------------------------ layout helpers

    @property
    def _dp(self) -> tuple[int, int]:
        return self.ps.get_data_parallel_world_size(), self.ps.get_data_parallel_rank()

    def _is_reporting_rank(self) -> bool:
        """One rank per data-parallel replica holds each result: last PP stage, TP rank 0."""
        return self.ps.is_pipeline_last_stage() and self.ps.get_tensor_model_parallel_rank() == 0

    def _sync_batch(self, batch: TokenBatch) -> TokenBatch:
        if dist.get_world_size() == 1:
            return batch
        box = [batch if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _local(self, batch: TokenBatch) -> tuple[TokenBatch, int, int, int]:
        """This DP rank's rows, padded to whole micro-batches: (rows, start, real count, micro-batches)."""
        if len(batch) % self.row_group:
            raise ValueError(f"a batch of {len(batch)} rows does not split into groups of {self.row_group}")
        start, stop, num_micro = local_rows(len(batch), *self._dp, self.micro_batch_size, self.row_group)
        rows = num_micro * self.micro_batch_size
        idx = list(range(start, stop)) + [0] * (rows - (stop - start))
        local = batch.select(torch.tensor(idx, dtype=torch.long))
        if stop - start < rows:  # padding rows: copies of row 0 that never enter the loss
            local.loss_mask = local.loss_mask.clone()
            local.loss_mask[stop - start :] = 0
        return local, start, stop - start, num_micro

    def _forward_step(self, loss_fn: LossFn | None):
        dev = self.device

        def step(data_iterator: Iterator[TokenBatch], model):
            mb = next(data_iterator)
            ids = mb.input_ids.to(dev)
            pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0).expand_as(ids)
            labels = torch.roll(ids, shifts=-1, dims=1)  # labels[:, t] = x_{t+1}; the last column is dropped
            out = model(ids, pos, None, labels=labels)

            def loss(nll: torch.Tensor):
                lp = torch.cat([torch.zeros_like(nll[:, :1]), -nll[:, :-1]], dim=1).float()
                lp = torch.where(mb.attention_mask.to(dev).bool(), lp, torch.zeros_like(lp))
                one = torch.ones((), dtype=torch.int, device=dev)
                if loss_fn is None:
                    return lp.sum() * 0.0, one, {"logprobs": lp.detach().cpu()}
                value, metrics = loss_fn(lp, _to(mb, dev))
                return value, one, {"loss": float(value.detach()), **metrics}

            return out, loss

        return step

    def _run(self, models, local: TokenBatch, num_micro: int, loss_fn: LossFn | None) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        fb = get_forward_backward_func()
        return fb(
            forward_step_func=self._forward_step(loss_fn),
            data_iterator=iter(local.micro_batches(self.micro_batch_size)),
            model=models,
            num_microbatches=num_micro,
            seq_length=local.input_ids.shape[1],
            micro_batch_size=self.micro_batch_size,
            forward_only=loss_fn is None,
        )

    # ------------------------------------------------------------------ Policy protocol

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, reference: bool = False) -> torch.Tensor:
        models = self.reference if reference else self.model
        if models is None:
            raise RuntimeError("this policy has no reference model")
        batch = self._sync_batch(batch)
        local, start, count, num_micro = self._local(batch)
        was = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            outs = self._run(models, local, num_micro, None)
        finally:
            for m, w in zip(models, was):
                m.train(w)
        full = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        if self._is_reporting_rank() and outs:
            full[start : start + count] = torch.cat([o["logprobs"] for o in outs])[:count]
        if dist.get_world_size() > 1:
            full = full.to(self._comm_device())
            dist.all_reduce(full)  # exactly one rank wrote each row; the rest are zeros
            full = full.cpu()
        return full

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        batch = self._sync_batch(batch)
        local, _, _, num_micro = self._local(batch)
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.schedule.at(self.steps_done)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        outs = self._run(self.model, local, num_micro, loss_fn)
        ok, grad_norm, _ = self.optimizer.step()
        self.steps_done += 1
        totals: dict[str, float] = {}
        if self._is_reporting_rank():
            for o in outs:
                for k, v in o.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        totals = all_sum_metrics(totals)
        return {**totals, "grad_norm": float(grad_norm), "lr": lr, **({} if ok else {"skipped_step": 1.0})}

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def engine_weights(self) -> dict[str, torch.Tensor]:
        """The full HF state dict (every rank gets all tensors) for ``HFEngine.update_weights``."""
        weights = {
            name: t.detach().cpu().clone()
            for name, t in self.bridge.export_hf_weights(self.model, cpu=True, show_progress=False)
        }
        embed = "model.embed_tokens.weight"
        if "lm_head.weight" not in weights and embed in weights:
            weights["lm_head.weight"] = weights[embed]  # tied embeddings
        return weights

    # ------------------------------------------------------------------ checkpoints

    def _sharded_state(self, loading: bool) -> dict[str, Any]:
        model_sd = {}
        for i, m in enumerate(self.model):
            key = "model" if len(self.model) == 1 else f"model{i}"
            model_sd[key] = _unwrap(m).sharded_state_dict()
        flat = {}
        for v in model_sd.values():
            flat.update(v)
        sd = dict(model_sd)
        # fully_reshardable: the distributed optimizer's state is saved per parameter, so a
        # checkpoint loads into another DP/TP/PP layout (the default format is rejected by 0.19).
        meta = {"distrib_optim_sharding_type": "fully_reshardable"}
        sd["optimizer"] = self.optimizer.sharded_state_dict(flat, is_loading=loading, metadata=meta)
        return sd

    def _rank0_path(self, path: Path) -> Path:
        box = [str(path)]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return Path(box[0])

    def save(self, path: Path) -> None:
        """Distributed checkpoint (``torch_dist``) of model and optimizer, plus the step count.

        Collective. Every rank writes into rank 0's ``path``."""
        from megatron.core import dist_checkpointing

        path = self._rank0_path(Path(path))
        if dist.get_rank() == 0:
            (path / "dist").mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state(loading=False), str(path / "dist"))
        if dist.get_rank() == 0:
            meta = {
                "steps_done": self.steps_done,
                "tensor_model_parallel_size": self.ps.get_tensor_model_parallel_world_size(),
                "pipeline_model_parallel_size": self.ps.get_pipeline_model_parallel_world_size(),
                "format": "megatron-dist-ckpt",
            }
            (path / "policy_state.json").write_text(json.dumps(meta))
        dist.barrier()

    def load(self, path: Path) -> None:
        from megatron.core import dist_checkpointing

        path = self._rank0_path(Path(path))
        if not (path / "policy_state.json").is_file():
            raise RuntimeError(f"{path} is not a megatron policy checkpoint (no policy_state.json)")
        added_steps = self._materialize_distributed_optimizer_state()
        sharded = self._sharded_state(loading=True)
        for st in added_steps:  # only state_dict() needed them; loading restores the real step
            st.pop("step", None)
        state = dist_checkpointing.load(sharded, str(path / "dist"))
        for i, m in enumerate(self.model):
            _unwrap(m).load_state_dict(state["model" if len(self.model) == 1 else f"model{i}"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(json.loads((path / "policy_state.json").read_text())["steps_done"])
        dist.barrier()

    def _materialize_distributed_optimizer_state(self) -> list[dict]:
        """A fresh DistributedOptimizer without Apex/TE cannot build its state dict (it reads Adam's
        ``step``, which exists only after a step): create zero state to load into. Returns the
        per-parameter states that got a placeholder ``step``."""
        added: list[dict] = []
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
            if type(opt).__name__ != "DistributedOptimizer" or init is None or inner is None:
                continue
            if any(len(st) for st in inner.state.values()):
                continue
            init(inner, getattr(opt, "config", None))
            for group in inner.param_groups:
                for p in group["params"]:
                    if "step" not in inner.state[p]:
                        inner.state[p]["step"] = torch.tensor(0.0)
                        added.append(inner.state[p])
        return added

    def export_hf(self, path: Path) -> None:
        """An HF folder (config, safetensors, tokenizer). Collective; rank 0 writes."""
        path = self._rank0_path(Path(path))
        self.bridge.save_hf_pretrained(self.model, str(path), show_progress=False)
        if dist.get_rank() == 0:
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path)
            (path / "pop_nemo.json").write_text(json.dumps({"exported_by": "pop_nemo", "backend": "megatron"}))
        dist.barrier()


def local_rows(n: int, dp: int, dp_rank: int, micro_batch_size: int, group: int = 1) -> tuple[int, int, int]:
    """``(start, stop, micro-batches)`` of a DP rank's contiguous share of ``n`` rows.

    Shares are whole groups of ``group`` rows (DPO's chosen/rejected pair is one group), so a
    group never straddles two ranks; with ``micro_batch_size`` a multiple of ``group`` and the
    share starting a micro-batch, it never straddles two micro-batches either. Every rank runs
    the same number of micro-batches (the pipeline schedule needs it); short ranks pad."""
    per = math.ceil(n / (dp * group)) * group
    start, stop = min(dp_rank * per, n), min((dp_rank + 1) * per, n)
    return start, stop, max(math.ceil(per / micro_batch_size), 1)


def _to(mb: TokenBatch, dev: torch.device) -> TokenBatch:
    if dev.type == "cpu":
        return mb
    return TokenBatch(
        mb.input_ids.to(dev),
        mb.attention_mask.to(dev),
        mb.loss_mask.to(dev),
        {k: v.to(dev) for k, v in mb.extras.items()},
    )
