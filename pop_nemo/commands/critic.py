"""``pop-nemo serve-critic``: the rubric writer and judge behind HTTP (dynamic batching)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from pop_nemo.critic.server import load_serve_config, serve

    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f"serve.host={args.host}")
    if args.port is not None:
        overrides.append(f"serve.port={args.port}")
    cfg, scfg = load_serve_config(args.config, overrides)
    return serve(cfg, scfg)


def register(sub) -> None:
    s = sub.add_parser(
        "serve-critic",
        help="serve the rubric writer and judge over HTTP (POST /v1/score, /v1/rubric; GET /healthz, /metrics)",
        description=(
            "Serve the reference model as rubric writer and judge. Binds 127.0.0.1 unless --host says "
            "otherwise; any other address needs a bearer token in $POP_NEMO_CRITIC_TOKEN."
        ),
    )
    s.add_argument("--config", required=True, help="YAML config, e.g. conf/critic_cpu.yaml (its serve: section)")
    s.add_argument("--host", help="address to bind (overrides serve.host; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (overrides serve.port)")
    s.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. serve.max_batch=64 rollout.judge.max_new_tokens=256"
    )
    s.set_defaults(func=run)
