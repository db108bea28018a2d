"""Two online steps (``pop_nemo.rl.grpo.train``, as ``pop-nemo train`` runs it), then checks what a
user relies on: where the built policy and rollout engines sit, and the outputs contract.

The device of every built object is read from its parameters, not assumed: the kit must show,
for example, that an engine stayed on the CPU while the policy trains on the GPU.

    python bench/gpu/online.py --backend hf --expect cuda --out runs/gpu_hf model.dtype=bfloat16
    python bench/gpu/online.py --backend megatron --expect cuda --out runs/gpu_megatron megatron.bf16=true

``--backend megatron`` runs one rank in this process (TP=1); it installs the test suite's
Megatron shim first (on a GPU without Transformer Engine only its TE placeholder, as
bench/train_step.py does; on a CPU the whole CUDA→CPU shim). Exit 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pop_nemo.run_output import read_jsonl  # noqa: E402
from tests.outputs_contract import ANSWER_KEYS, METRIC_KEYS, RECORD_KEYS  # noqa: E402


def module_devices(obj) -> list[str]:
    """Sorted device types ('cpu', 'cuda') of the parameters of a module, a list of modules, or
    an object with a ``.model``; [] when there is none (e.g. a remote engine)."""
    import torch

    if obj is None:
        return []
    if isinstance(obj, torch.nn.Module):
        return sorted({p.device.type for p in obj.parameters()})
    if isinstance(obj, list | tuple):
        return sorted({d for m in obj for d in module_devices(m)})
    return module_devices(getattr(obj, "model", None))


def placement(backends) -> dict[str, list[str]]:
    """Device types of each object ``build.build_backends`` made."""
    return {
        "policy": module_devices(backends.policy.model),
        "policy_reference": module_devices(getattr(backends.policy, "reference", None)),
        "policy_engine": module_devices(backends.policy_engine),
        "reference_engine": module_devices(backends.reference_engine),
    }


def placement_problems(devices: dict[str, list[str]], expect: str) -> list[str]:
    """One line per built object that is not (only) on ``expect``; an absent reference is fine."""
    out = []
    for name, types in devices.items():
        if not types and name == "policy_reference":
            continue
        if types != [expect]:
            out.append(f"{name} on {'+'.join(types) or 'nothing'}, expected {expect}")
    return out


def contract_problems(metrics: list[dict], records: list[dict], steps: int, docs_per_step: int, n: int) -> list[str]:
    """What breaks the outputs contract, one line each (empty: it holds). A step whose update
    did not run (every sample masked) is a problem too: the kit is meant to exercise it."""
    out = []
    if [m.get("step") for m in metrics] != list(range(1, steps + 1)):
        out.append(f"metrics.jsonl steps {[m.get('step') for m in metrics]}, expected 1..{steps}")
    for m in metrics:
        if missing := [k for k in METRIC_KEYS if k not in m]:
            out.append(f"step {m.get('step')}: metrics lack {missing}")
        if m.get("loss") is None:
            out.append(f"step {m.get('step')}: no policy update (every sample masked)")
    if len(records) != steps * docs_per_step:
        out.append(f"records.jsonl has {len(records)} lines, expected {steps * docs_per_step}")
    for r in records:
        if missing := [k for k in RECORD_KEYS if k not in r]:
            out.append(f"record {r.get('group_id')}: lacks {missing}")
            continue
        if r["problem"] and len(r["answers"]) != n:
            out.append(f"record {r['group_id']}: {len(r['answers'])} answers, expected {n}")
        for a in r["answers"]:
            if missing := [k for k in ANSWER_KEYS if k not in a]:
                out.append(f"record {r['group_id']}: an answer lacks {missing}")
                break
    return out


def _lines(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["hf", "megatron"], required=True)
    ap.add_argument("--config", default=str(ROOT / "tests" / "conf" / "tiny.yaml"))
    ap.add_argument("--expect", choices=["cuda", "cpu"], required=True, help="where every built object must sit")
    ap.add_argument("--out", required=True, help="the run folder (replaced)")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.backend == "megatron":
        from tests.megatron import cpu_shim

        cpu_shim.install()
    import torch

    from pop_nemo import build, launch
    from pop_nemo.rl.grpo import train

    built = []
    real = build.build_backends
    result: dict = {"backend": args.backend, "expect": args.expect, "torch": torch.__version__, "problems": []}

    def capture(*a, **kw):
        built.append(real(*a, **kw))
        if args.json:  # where things sit is known now: keep it even if the steps run out of time
            devices = placement(built[-1])
            early = {**result, "devices": devices, "problems": placement_problems(devices, args.expect)}
            Path(args.json).write_text(json.dumps({**early, "ok": False, "stage": "built, steps not done"}, indent=1))
        return built[-1]

    build.build_backends = capture  # the trainer calls build.build_backends: keep what it built
    overrides = [f"policy.backend={args.backend}", "trainer.max_steps=2", "trainer.save_every=2", *args.overrides]
    cfg = launch.rank_config(args.config, overrides, args.out)
    out = Path(cfg.output_dir)
    try:
        train(cfg, fresh=True)
    except Exception as e:  # report it with whatever was built, then fail
        result["problems"].append(f"train failed: {type(e).__name__}: {e}")
    if built:
        result["devices"] = placement(built[0])
        result["problems"] += placement_problems(result["devices"], args.expect)
    metrics, records = _lines(out / "metrics.jsonl"), _lines(out / "records.jsonl")
    result["problems"] += contract_problems(metrics, records, 2, cfg.rollout.docs_per_step, cfg.rollout.n)
    keep = ("step", "loss", "kl", "reward_mean", "tokens_per_s", "train_tokens_per_s", "time_step", "time_train")
    result["metrics"] = [{k: m.get(k) for k in keep} for m in metrics]
    result["ok"] = not result["problems"]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
