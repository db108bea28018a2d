"""One rank of the Megatron checks. Launched by ``run_workers`` (tests/megatron/launch_util.py)
as ``python -m torch.distributed.run --nproc-per-node N tests/megatron/worker.py ...``.

For each requested layout it builds a :class:`MegatronPolicy`, measures it against
:class:`HFPolicy` on the same weights and batches, and rank 0 writes every number to
``--out`` (JSON). The pytest files assert on those numbers; nothing is judged here.

Measured per layout (``tp2``, ``pp2``, ``dp2``, ``tp1``):
* logprobs and reference logprobs of a tiny random Qwen2 vs HF; SmolLM2 logprobs vs HF;
* a 3-step GRPO trajectory (loss, pg_loss, kl, grad_norm, lr per step) vs HF's;
* HF → Megatron → HF: the exported folder's tensors vs the original's, and its logits;
* the export after training vs Megatron's own logprobs, and ``engine_weights`` vs the export;
* save after step 1, a fresh policy resumes and runs steps 2-3: equal to the uninterrupted run
  (and, for ``pp2``, resuming the ``tp2`` checkpoint: a different layout).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.megatron import cpu_shim  # noqa: E402

cpu_shim.install()  # CPU: the CUDA shim; GPU without Transformer Engine: only the TE placeholder
if torch.cuda.is_available():
    cpu_shim = None

import torch.distributed as dist  # noqa: E402

from pop_nemo.policies.base import TokenBatch  # noqa: E402
from pop_nemo.rl.losses import LossConfig, normalizer, policy_loss  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}
LOSS = LossConfig(clip_eps=0.2, kl_coef=0.1, kl_mode="k3_loss", aggregation="token_mean")
OPT = dict(lr=1e-3, total_steps=3, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.1, max_grad_norm=1.0)
MBS = 2
STEPS = 3


def tiny_batch(vocab: int, rows: int = 5, seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for _ in range(rows):
        prompts.append(torch.randint(4, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist())
        comps.append(torch.randint(4, vocab, (int(torch.randint(2, 11, (1,), generator=g)),), generator=g).tolist())
    return TokenBatch.from_sequences(prompts, comps, pad_id=0)


def smol_batch(tokenizer) -> TokenBatch:
    texts = [
        ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", "Paris is."),
        (
            "<|im_start|>user\nName a prime number.<|im_end|>\n<|im_start|>assistant\n",
            "Seven is a prime number, as is 11.",
        ),
    ]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in texts]
    comps = [tokenizer(c, add_special_tokens=False)["input_ids"] for _, c in texts]
    return TokenBatch.from_sequences(prompts, comps, pad_id=tokenizer.pad_token_id)


def trajectory(policy, batch: TokenBatch, steps: int, after_each=None, start: int = 0) -> list[dict]:
    """The loop's update (rl/grpo.py): old/ref logprobs from the policy, then one train_step."""
    out = []
    for s in range(start, steps):
        old = policy.logprobs(batch)
        ref = policy.logprobs(batch, reference=True)
        adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(100 + s))
        b = TokenBatch(batch.input_ids, batch.attention_mask, batch.loss_mask, {"advantages": adv, "old_logprobs": old})
        b.extras["ref_logprobs"] = ref
        norm = normalizer(b.loss_mask, LOSS.aggregation)

        def loss_fn(lp, mb, norm=norm):
            # HFPolicy hands CPU micro-batches to the loss on a GPU (reported): move them here.
            ex = {k: v.to(lp.device) for k, v in mb.extras.items()}
            mask = mb.loss_mask.to(lp.device)
            return policy_loss(lp, ex["old_logprobs"], ex["advantages"], mask, LOSS, ex["ref_logprobs"], norm)

        out.append(policy.train_step(b, loss_fn))
        if after_each is not None:
            after_each(s + 1)
    return out


def masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).abs()[mask.bool()].max())


def hf_policy(path: str, with_reference: bool = True):
    from transformers import AutoModelForCausalLM

    from pop_nemo.policies.hf import HFPolicy

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev) if with_reference else None
    return HFPolicy(model, ref, None, micro_batch_size=MBS, **OPT)


def megatron_policy(path: str, layout: str, with_reference: bool = True, tokenizer=None):
    from pop_nemo.policies.megatron import MegatronPolicy

    tp, pp = LAYOUTS[layout]
    return MegatronPolicy(
        path,
        tokenizer,
        micro_batch_size=MBS,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        with_reference=with_reference,
        seed=1234,
        **OPT,
    )


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def hf_logprobs(folder: str, batch: TokenBatch) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from pop_nemo.policies.base import token_logprobs

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_logprobs(logits, batch.input_ids)


def run_layout(layout: str, args, ref: dict, work: Path, res: dict) -> None:
    from megatron.core import parallel_state as ps

    rank0 = dist.get_rank() == 0
    r: dict = {}
    t0 = time.perf_counter()
    batch = tiny_batch(260)
    mask = batch.attention_mask

    # --- tiny Qwen2: logprobs, round trip, trajectory with save/resume, export after training
    pol = megatron_policy(args.tiny, layout)
    r["dp_size"] = ps.get_data_parallel_world_size()
    lp, rlp = pol.logprobs(batch), pol.logprobs(batch, reference=True)
    if rank0:
        r["tiny_logprobs_max_abs_diff"] = masked_max_diff(lp, ref["tiny_lp"], mask)
        r["tiny_ref_logprobs_max_abs_diff"] = masked_max_diff(rlp, ref["tiny_lp"], mask)
        r["logprobs_pad_is_zero"] = bool((lp[~mask.bool()] == 0).all())

    rt = work / f"roundtrip_{layout}"
    pol.export_hf(rt)
    if rank0:
        orig, back = hf_tensors(Path(args.tiny)), hf_tensors(rt)
        r["roundtrip_same_names"] = sorted(orig) == sorted(back)
        r["roundtrip_max_abs_diff"] = max(float((orig[k] - back[k]).abs().max()) for k in orig if k in back)
        r["roundtrip_logits_max_abs_diff"] = masked_max_diff(hf_logprobs(str(rt), batch), ref["tiny_lp"], mask)
        r["roundtrip_has_tokenizer"] = (rt / "tokenizer.json").is_file() or (rt / "tokenizer_config.json").is_file()

    ckpt = work / f"ckpt_{layout}"

    def save_after_first(step: int, pol=pol) -> None:
        if step == 1:
            pol.save(ckpt)

    r["trajectory"] = trajectory(pol, batch, STEPS, after_each=save_after_first)
    lp_after = pol.logprobs(batch)
    exported = work / f"trained_{layout}"
    pol.export_hf(exported)
    weights = pol.engine_weights()
    if rank0:
        r["export_after_training_vs_megatron_max_abs_diff"] = masked_max_diff(
            hf_logprobs(str(exported), batch), lp_after, mask
        )
        saved = hf_tensors(exported)
        r["engine_weights_vs_export_max_abs_diff"] = max(float((weights[k] - saved[k]).abs().max()) for k in saved)
        r["engine_weights_cover_export"] = set(saved) <= set(weights)
    del pol

    resumed = megatron_policy(args.tiny, layout)
    resumed.load(ckpt)
    r["resumed_steps_done"] = resumed.steps_done
    r["resumed_trajectory"] = trajectory(resumed, batch, STEPS, start=1)
    lp_resumed = resumed.logprobs(batch)
    if rank0:
        r["resumed_logprobs_max_abs_diff"] = masked_max_diff(lp_resumed, lp_after, mask)
    del resumed

    if layout == "pp2" and (work / "ckpt_tp2" / "policy_state.json").is_file():
        other = megatron_policy(args.tiny, layout)
        other.load(work / "ckpt_tp2")
        r["resumed_from_tp2_trajectory"] = trajectory(other, batch, STEPS, start=1)
        del other

    # --- SmolLM2: logprobs only
    heads = json.loads((Path(args.smol) / "config.json").read_text())["num_attention_heads"] if args.smol else 0
    if args.smol and heads % LAYOUTS[layout][0]:
        # SmolLM2-135M has 9 attention heads (3 KV heads): no TP=2 split exists.
        r["smol_skipped"] = f"{heads} attention heads do not split over TP={LAYOUTS[layout][0]}"
    elif args.smol:
        from pop_nemo.models import load_tokenizer

        sb = smol_batch(load_tokenizer(args.smol))
        sp = megatron_policy(args.smol, layout, with_reference=False)
        slp = sp.logprobs(sb)
        if rank0:
            r["smol_logprobs_max_abs_diff"] = masked_max_diff(slp, ref["smol_lp"], sb.attention_mask)
            r["smol_tokens"] = int(sb.attention_mask.sum())
        del sp

    r["seconds"] = time.perf_counter() - t0
    if cpu_shim is not None:
        uses: list = [None] * dist.get_world_size()
        dist.all_gather_object(uses, cpu_shim.unshimmed_cuda_uses())
        r["unshimmed_cuda_uses"] = sorted({tuple(u) for per_rank in uses for u in per_rank})
    res[layout] = r
    ps.destroy_model_parallel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--smol", default="")
    ap.add_argument("--layouts", default="tp2,pp2,dp2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from pop_nemo.distributed import init_distributed

    init_distributed(timeout_s=600)
    rank0 = dist.get_rank() == 0
    work = Path(args.work)
    ref: dict = {}
    res: dict = {"world_size": dist.get_world_size(), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if rank0:  # the HF reference numbers, computed once
        batch = tiny_batch(260)
        hp = hf_policy(args.tiny)
        ref["tiny_lp"] = hp.logprobs(batch)
        res["hf_trajectory"] = trajectory(hp, batch, STEPS)
        del hp
        if args.smol:
            from pop_nemo.models import load_tokenizer

            sb = smol_batch(load_tokenizer(args.smol))
            ref["smol_lp"] = hf_policy(args.smol, with_reference=False).logprobs(sb)
    for layout in args.layouts.split(","):
        run_layout(layout, args, ref, work, res)
    if rank0:
        res["megatron_core"] = importlib.metadata.version("megatron-core")
        Path(args.out).write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    from pop_nemo.policies.megatron import stop_checkpoint_writer

    stop_checkpoint_writer()  # os._exit skips the atexit hook that would stop it: it was left orphaned
    os._exit(0)  # skip slow interpreter teardown of megatron/triton state


if __name__ == "__main__":
    main()
