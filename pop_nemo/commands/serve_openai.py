"""``pop-nemo serve-openai``: a model behind an OpenAI-compatible ``/v1/chat/completions``."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from pop_nemo.build import hf_engine_loader
    from pop_nemo.config import ConfigError, apply_overrides, build_section
    from pop_nemo.engines.openai_server import ServeOpenAIConfig, check_openai_config, serve

    flags = {
        "model_name": args.served_model_name or args.model,
        "host": args.host,
        "port": args.port,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "max_queue": args.max_queue,
        "default_max_tokens": args.default_max_tokens,
        "max_context": args.max_context,
    }
    # The same serve.* names and checks as serve-critic's serve: section (pop_nemo.serving.ServeLimits).
    bad = [o for o in args.overrides if not o.startswith("serve.")]
    if bad:
        raise ConfigError(f"{bad[0]!r}: serve-openai takes only serve.* overrides (e.g. serve.max_queue=512)")
    data = apply_overrides({"serve": flags}, list(args.overrides))
    cfg = check_openai_config(build_section(ServeOpenAIConfig, data["serve"], "serve"))
    load = hf_engine_loader(args.model, args.dtype, args.device, cfg.max_batch, args.num_threads, args.seed)
    return serve(load, cfg)


def register(sub) -> None:
    s = sub.add_parser(
        "serve-openai",
        help="serve a model (HF engine) behind an OpenAI-compatible /v1/chat/completions",
        description=(
            "An OpenAI-compatible server (n, seed, temperature, top_p, max_tokens, logprobs, json_schema "
            "response_format, vLLM guided_* extensions) over the HF engine with dynamic batching. Binds "
            "127.0.0.1 unless --host says otherwise; any other address needs $POP_NEMO_OPENAI_TOKEN."
        ),
    )
    s.add_argument("--model", default="smollm2", help="'smollm2' (bundled), an HF folder or a hub id")
    s.add_argument("--served-model-name", help="the name clients pass as 'model' (default: --model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--num-threads", type=int, help="torch CPU threads")
    s.add_argument("--max-batch", type=int, default=16, help="requests per engine call")
    s.add_argument("--max-wait-ms", type=float, default=10.0, help="wait this long for a fuller batch")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 503")
    s.add_argument("--default-max-tokens", type=int, default=256, help="when a request gives no max_tokens")
    s.add_argument("--max-context", type=int, help="prompt + max_tokens limit (default: the model's)")
    s.add_argument("--seed", type=int, default=0, help="engine RNG for requests without a seed")
    s.add_argument(
        "overrides",
        nargs="*",
        help="dotted serve.* overrides, as serve-critic takes them: serve.item_timeout_s=60 serve.max_body_mb=4",
    )
    s.set_defaults(func=run)
