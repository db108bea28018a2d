"""The GPU acceptance kit's summary: one line per part from the JSON it wrote. Pure functions."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def junit_counts(xml_text: str) -> dict[str, int]:
    """tests, failures (incl. errors) and skipped of a pytest --junitxml report."""
    root = ET.fromstring(xml_text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {
        "tests": n["tests"],
        "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
        "failed": n["failures"] + n["errors"],
        "skipped": n["skipped"],
    }


def headline(name: str, data: dict | None) -> str:
    """The summary's result cell for a part's own JSON (empty when it wrote none)."""
    if not data:
        return ""
    if name == "env":
        return ", ".join(f"{k} {v}" for k, v in data.items())
    if name == "pytest_gpu":
        return f"{data['passed']} passed, {data['failed']} failed, {data['skipped']} skipped"
    if name.startswith("online_"):
        dev = ", ".join(f"{k} {'+'.join(v) or '—'}" for k, v in data.get("devices", {}).items())
        steps = "; ".join(f"step {m['step']} {_fmt(m.get('time_step'), '.1f')} s" for m in data.get("metrics", []))
        probs = "; ".join(data.get("problems", [])) or "contract holds"
        return f"{dev}. {steps}. {probs}"
    if name == "critic_load":
        b, u = data.get("runs", {}).get("batched", []), data.get("runs", {}).get("max_batch=1", [])
        cells = [
            f"{x['clients']} clients {x['items_per_s'] / y['items_per_s']:.2f}× ({x['items_per_s']:.2f} vs {y['items_per_s']:.2f} items/s)"
            for x, y in zip(b, u)
        ]
        return "; ".join(cells) or "no level finished"
    if name == "synthesis":
        return (
            f"{_fmt(data.get('ratio_examples_per_s'))}× ({data.get('docs')} docs, N={data.get('n')}, "
            f"{data.get('max_batch')} rows/forward; sequential {_fmt(data['sequential']['seconds'], '.1f')} s, "
            f"batched {_fmt(data['batched']['seconds'], '.1f')} s)"
        )
    if name == "pipeline":
        return f"stage/raw {_fmt(data.get('ratio'))} ({_fmt(data.get('stage_tok_s'), '.1f')} vs {_fmt(data.get('raw_tok_s'), '.1f')} tok/s)"
    if name.startswith("train_step"):
        m, h = data.get("megatron", {}), data.get("hf", {})
        mfu = f", MFU {_fmt(m.get('mfu_vs_bf16_dense_peak'), '.1%')} / {_fmt(h.get('mfu_vs_bf16_dense_peak'), '.1%')}"
        return (
            f"{data.get('preset')}: Megatron {_fmt(m.get('tokens_per_s'), '.0f')} vs HF {_fmt(h.get('tokens_per_s'), '.0f')} tok/s, "
            f"ratio {_fmt(data.get('megatron_over_hf_tokens_per_s'))}{mfu if 'mfu_vs_bf16_dense_peak' in m else ''}"
        )
    return json.dumps(data)[:200]


def summary_table(mode: str, results: list[dict], command: str) -> str:
    """The markdown summary: one row per part, in run order."""
    lines = [
        f"# GPU acceptance kit: {mode} run",
        "",
        f"Command: `{command}`",
        "",
        "| part | status | seconds / budget | result | what |",
        "|---|---|---:|---|---|",
    ]
    for r in results:
        cell = r.get("headline") or r.get("error", "")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} / {r['budget']} | {cell} | {r['what']} |")
    passed = sum(r["status"].startswith("pass") for r in results)
    lines += ["", f"{passed} of {len(results)} parts passed."]
    return "\n".join(lines) + "\n"


def failed(status: str) -> bool:
    """A part that failed, ran out of its budget, or never ran for lack of time."""
    return status.startswith(("fail", "timeout", "skipped (deadline)"))
