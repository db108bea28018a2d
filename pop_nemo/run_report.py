"""``pop-nemo report``: a self-contained HTML page (and PNGs) of a run, readable without JSONL.

Reads what the run wrote: ``metrics.jsonl`` (online loop or DPO: one row per step),
``records.jsonl`` (every self-play example; online and offline share the schema),
``pairs.jsonl`` (offline chosen/rejected pairs), in-loop evaluations (``eval/*`` metrics) and
any ``pop-nemo eval`` folders given with ``--eval``. Writes ``REPORT_DIR/index.html`` with
every figure embedded as a PNG data URI (the page is one file: mail it, attach it to a ticket)
and the same PNGs next to it. Each ``<figure>`` names the metrics it plots in
``data-metrics``, and the plotted series are embedded as JSON (``<script id="report-data">``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pop_nemo.run_output import read_jsonl

# (file name, title, metric keys, y label); every metric the issue names has a home here.
FIGURES: list[tuple[str, str, list[str], str]] = [
    ("reward", "Reward: mean ± std over trainable answers (judge score / 2)", ["reward_mean", "reward_std"], "reward"),
    (
        "validity",
        "Validity rate per role",
        ["proposer_valid_rate", "rubric_valid_rate", "solver_format_valid_rate", "judge_valid_rate"],
        "rate",
    ),
    ("kl_loss", "Policy loss and KL to the reference", ["loss", "kl"], ""),
    ("lengths", "Solver reply length", ["response_len_mean", "train_tokens"], "tokens"),
    ("throughput", "Throughput", ["tokens_per_s", "train_tokens_per_s"], "tokens / s"),
    (
        "stage_seconds",
        "Seconds per stage (bars) and per step (line)",
        ["time_propose", "time_solve", "time_rubric", "time_judge", "time_train", "time_step"],
        "seconds",
    ),
    ("judge_failures", "Judge failures and timeouts per step", ["judge_failures", "judge_timeouts"], "answers"),
]
DERIVED = {"judge_failures"}  # computed from records.jsonl


class ReportError(ValueError):
    pass


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("pop-nemo report draws with matplotlib: pip install 'pop-nemo[plots]'") from None
    return Figure


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _read(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.is_file() else []


# ---------------------------------------------------------------- data


@dataclass
class RunData:
    run: Path
    metrics: list[dict[str, Any]]
    records: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    evals: list[tuple[Path, dict[str, Any], dict[str, Any] | None]]  # (folder, summary, comparison)

    @property
    def steps(self) -> list[int]:
        return [int(m.get("step", i + 1)) for i, m in enumerate(self.metrics)]

    def series(self, key: str) -> list[float | None]:
        if key == "judge_failures":
            return self.judge_failures_by_step()
        return [_num(m.get(key)) for m in self.metrics]

    def judge_failures_by_step(self) -> list[float | None]:
        """Answers whose judge call failed (parse error, timeout, server error), per step."""
        if not self.records:
            return [None] * len(self.metrics)
        per: dict[int, int] = {}
        for r in self.records:
            n = sum(a.get("judge_valid") is False for a in r.get("answers", []))
            per[int(r.get("step", 0))] = per.get(int(r.get("step", 0)), 0) + n
        return [float(per.get(s, 0)) for s in self.steps]


def load_run(run: Path, eval_dirs: list[Path] | None = None) -> RunData:
    if not run.is_dir():
        raise ReportError(f"--run {str(run)!r} is not a folder")
    metrics, records = _read(run / "metrics.jsonl"), _read(run / "records.jsonl")
    pairs = _read(run / "pairs.jsonl")
    evals = []
    for d in ([run] if (run / "summary.json").is_file() else []) + list(eval_dirs or []):
        s = d / "summary.json"
        if not s.is_file():
            raise ReportError(f"--eval {str(d)!r} holds no summary.json; run `pop-nemo eval --output-dir {d}` first")
        comp = d / "comparison.json"
        evals.append((d, json.loads(s.read_text()), json.loads(comp.read_text()) if comp.is_file() else None))
    if not (metrics or records or pairs or evals):
        raise ReportError(
            f"{run} holds none of metrics.jsonl, records.jsonl, pairs.jsonl or summary.json: is it a pop-nemo run?"
        )
    return RunData(run, metrics, records, pairs, evals)


# ---------------------------------------------------------------- figures


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _empty(ax, keys: list[str]) -> None:
    ax.text(0.5, 0.5, "no data: " + ", ".join(keys) + "\n(absent or null at every step)", ha="center", va="center")
    ax.set_xticks([])
    ax.set_yticks([])


def _line(ax, steps: list[int], ys: list[float | None], label: str, **kw) -> bool:
    pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
    if not pts:
        return False
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **{"marker": "o", **kw})
    return True


def _step_axis(ax, steps: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _figure(Figure, data: RunData, name: str, title: str, keys: list[str], ylabel: str):
    steps = data.steps
    if name in ("kl_loss", "reward"):
        fig = Figure(figsize=(9, 3.4))
        axes = fig.subplots(1, 2)
    else:
        fig = Figure(figsize=(7, 3.6))
        axes = [fig.subplots()]
    fig.suptitle(title, fontsize=10)
    if name == "reward":
        mean, std = data.series("reward_mean"), data.series("reward_std")
        ax = axes[0]
        if _line(ax, steps, mean, "reward_mean"):
            pts = [(s, m, d) for s, m, d in zip(steps, mean, std) if m is not None and d is not None]
            ax.fill_between([p[0] for p in pts], [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts], alpha=0.2)
            ax.set_ylabel("reward_mean ± std")
            ax.legend(fontsize=8)
        else:
            _empty(ax, ["reward_mean"])
        if not _line(axes[1], steps, std, "reward_std", color="tab:orange"):
            _empty(axes[1], ["reward_std"])
        else:
            axes[1].set_ylabel("reward_std")
    elif name == "kl_loss":
        for ax, key in zip(axes, ("loss", "kl")):
            if _line(ax, steps, data.series(key), key):
                ax.set_ylabel(key)
            else:
                _empty(ax, [key])
    elif name == "stage_seconds":
        ax = axes[0]
        bottom = [0.0] * len(steps)
        drew = False
        for key in keys:
            if key == "time_step":
                continue
            ys = [y or 0.0 for y in data.series(key)]
            if any(ys):
                ax.bar(steps, ys, bottom=bottom, label=key.removeprefix("time_"), width=0.6)
                bottom = [b + y for b, y in zip(bottom, ys)]
                drew = True
        total = data.series("time_step")
        drew = _line(ax, steps, total, "step total (time_step)", color="black") or drew
        if drew:
            ax.set_ylabel(ylabel)
            top = max([*bottom, *(t for t in total if t is not None)])
            ax.set_ylim(0, 1.45 * top if top > 0 else 1)  # room for the legend above the bars
            ax.legend(fontsize=8, ncol=4, loc="upper left")
        else:
            _empty(ax, keys)
    else:
        ax = axes[0]
        drew = False
        for i, key in enumerate(keys):  # distinct markers and sizes: equal series stay visible
            style = {"marker": "osD^"[i % 4], "fillstyle": "none", "markersize": 12 - 2 * (i % 4), "ls": "-:"[i % 2]}
            drew = _line(ax, steps, data.series(key), key, **style) or drew
        if drew:
            ax.set_ylabel(ylabel)
            if name == "validity":
                ax.set_ylim(-0.05, 1.05)
            ax.legend(fontsize=8)
        else:
            _empty(ax, keys)
    for ax in axes:
        _step_axis(ax, steps)
    fig.tight_layout()
    return fig


def _time_keys(data: RunData) -> list[str]:
    return list(dict.fromkeys(k for m in data.metrics for k in m if k.startswith("time_") or k == "eval/time_s"))


def _eval_keys(data: RunData) -> list[str]:
    keys = {k for m in data.metrics for k in m if k.startswith("eval/")}
    return sorted(keys)


def _eval_figure(Figure, data: RunData):
    """Held-out reward per mode and HealthBench score over training steps, with CI bands."""
    keys = _eval_keys(data)
    means = [k for k in keys if k.endswith(("/reward", "/score"))]
    if not means:
        return None, []
    steps = data.steps
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    fig.suptitle("Held-out evaluation during training (mean, CI band)", fontsize=10)
    shown = []
    for k, marker in zip(means, "osD^v<>p*h" * 4):
        lo, hi = data.series(f"{k}_ci_low"), data.series(f"{k}_ci_high")
        if _line(ax, steps, data.series(k), k.removeprefix("eval/"), marker=marker, fillstyle="none", markersize=9):
            pts = [(s, a, b) for s, a, b in zip(steps, lo, hi) if a is not None and b is not None]
            ax.fill_between([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], alpha=0.2)
            shown += [k, f"{k}_ci_low", f"{k}_ci_high"]
    if not shown:
        _empty(ax, means)
        shown = means
    else:
        ax.set_ylim(-0.03, 1.3)  # rewards and scores live in [0, 1]; the legend sits above them
        ax.legend(fontsize=8, loc="upper left", ncol=3)
        ax.set_ylabel("score")
    _step_axis(ax, steps)
    if steps:
        ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    fig.tight_layout()
    return fig, shown


def _other_keys(data: RunData, taken: set[str]) -> list[str]:
    keys: list[str] = []
    for m in data.metrics:
        for k, v in m.items():
            if k in taken or k == "step" or k.startswith("eval/") or k in keys:
                continue
            if _num(v) is not None:
                keys.append(k)
    return keys


def _grid_figure(Figure, data: RunData, keys: list[str], title: str):
    cols = 4
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(12, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.suptitle(title, fontsize=10)
    for i, ax in enumerate(axes.flat):
        if i >= len(keys):
            ax.set_visible(False)
            continue
        if not _line(ax, data.steps, data.series(keys[i]), keys[i], markersize=3):
            _empty(ax, [keys[i]])
        ax.set_title(keys[i], fontsize=8)
        ax.tick_params(labelsize=7)
        _step_axis(ax, data.steps)
        ax.set_xlabel("")
    fig.tight_layout()
    return fig


def short_label(label: Any, parts: int = 2) -> str:
    """``/long/path/run/checkpoints/step_000002`` → ``checkpoints/step_000002`` (for legends)."""
    text = str(label)
    return "/".join(Path(text).parts[-parts:]) if "/" in text else text


def _comparison_figure(Figure, comparison: dict[str, Any]):
    rows = [(f"held-out {m}", p) for m, p in comparison.get("heldout", {}).items()]
    if "healthbench" in comparison:
        rows.append(("healthbench", comparison["healthbench"]))
    rows = [(n, p) for n, p in rows if p["n"] > 0]
    if not rows:
        return None
    a, b = short_label(comparison["baseline"]), short_label(comparison["model"])
    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    fig.suptitle(f"B = {b}  vs  A = {a}  (paired on the same problems)", fontsize=10)
    x = list(range(len(rows)))
    ax1.bar([i - 0.2 for i in x], [p["mean_a"] for _, p in rows], width=0.4, label=f"A: {a}", color="tab:gray")
    ax1.bar([i + 0.2 for i in x], [p["mean_b"] for _, p in rows], width=0.4, label=f"B: {b}", color="tab:blue")
    ax1.set_xticks(x, [f"{n}\n(n={p['n']})" for n, p in rows], fontsize=8)
    ax1.set_ylabel("mean score")
    ax1.set_ylim(0, 1.15)
    ax1.legend(fontsize=7, loc="upper right")
    for i, (_, p) in enumerate(rows):
        d, w = p["diff"], p["win_rate"]
        kw = {"capsize": 4, "markersize": 7}
        ax2.errorbar(
            i - 0.1, d["mean"], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", color="tab:blue", **kw
        )
        ax2.errorbar(
            i + 0.1, w["mean"], yerr=[[w["mean"] - w["low"]], [w["high"] - w["mean"]]], fmt="s", color="tab:green", **kw
        )
    ax2.plot([], [], "o", color="tab:blue", label="difference B−A")
    ax2.plot([], [], "s", color="tab:green", label="win rate of B (tie = ½)")
    ax2.axhline(0.0, color="tab:blue", lw=0.8, ls=":")
    ax2.axhline(0.5, color="tab:green", lw=0.8, ls=":")
    ax2.set_xticks(x, [n for n, _ in rows], fontsize=8)
    ax2.set_title("with confidence intervals", fontsize=8)
    ax2.legend(fontsize=7, loc="upper right")
    ax2.set_ylim(min(-0.55, *(p["diff"]["low"] - 0.05 for _, p in rows)), 1.15)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- tables


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _cut(text: str | None, n: int = 1200) -> str:
    text = text or ""
    return text if len(text) <= n else text[:n] + " …"


def _fmt(v: Any, pct: bool = False) -> str:
    v = _num(v)
    if v is None:
        return "—"
    return f"{100 * v:.1f}%" if pct else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}")


def _summary_table(data: RunData, keys: list[str]) -> str:
    rows = []
    for k in keys:
        ys = [y for y in data.series(k) if y is not None]
        last = ys[-1] if ys else None
        rows.append(
            f"<tr><td><code>{_e(k)}</code></td><td>{_fmt(last)}</td><td>{_fmt(min(ys) if ys else None)}</td>"
            f"<td>{_fmt(max(ys) if ys else None)}</td><td>{_fmt(sum(ys) / len(ys) if ys else None)}</td></tr>"
        )
    head = "<tr><th>metric</th><th>last</th><th>min</th><th>max</th><th>mean</th></tr>"
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


def records_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    answers = [a for r in records for a in r.get("answers", [])]
    rewards = [a["reward"] for a in answers if _num(a.get("reward")) is not None]
    return {
        "examples": len(records),
        "valid problems": sum(bool(r.get("proposer_valid")) for r in records),
        "valid rubrics": sum(bool(r.get("rubric_valid")) for r in records),
        "answers": len(answers),
        "answers with valid format": sum(bool(a.get("format_valid")) for a in answers),
        "answers judged": sum(a.get("judge_valid") is not None for a in answers),
        "judge failures": sum(a.get("judge_valid") is False for a in answers),
        "mean reward of judged answers": (sum(rewards) / len(rewards)) if rewards else None,
    }


def _kv_table(d: dict[str, Any], cls: str) -> str:
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v) if isinstance(v, float) else v)}</td></tr>" for k, v in d.items()
    )
    return f'<table class="{cls}">{rows}</table>'


def _rubric_html(rubric: list[dict[str, Any]] | None) -> str:
    if not rubric:
        return "—"
    items = "".join(
        f"<li><b>{_e(c.get('name'))}</b> (weight {_e(c.get('weight'))}): {_e(c.get('description'))}"
        f"<br><i>gold:</i> {_e(c.get('gold'))}</li>"
        for c in rubric
    )
    return f"<ol>{items}</ol>"


def examples_table(records: list[dict[str, Any]], limit: int) -> str:
    """Problems with a valid rubric and judged answers, newest first: best and worst answer."""
    scored = []
    for r in records:
        answers = [a for a in r.get("answers", []) if _num(a.get("reward")) is not None and a.get("judge_valid")]
        if r.get("rubric_valid") and answers:
            scored.append((r, answers))
    scored.sort(key=lambda t: -int(t[0].get("step", 0)))
    if not scored:
        return '<p class="examples-empty">No example has a valid rubric and a judged answer yet.</p>'
    rows = []
    for r, answers in scored[:limit]:
        best = max(answers, key=lambda a: a["reward"])  # first argmax, as the pairing does
        worst = min(answers, key=lambda a: a["reward"])
        rows.append(
            "<tr>"
            f"<td>{_e(r.get('step', '—'))}</td><td><code>{_e(r.get('doc_id'))}</code></td>"
            f"<td>{_e(_cut(r.get('problem')))}<hr><i>reference:</i> {_e(_cut(r.get('reference'), 600))}</td>"
            f"<td>{_rubric_html(r.get('rubric'))}</td>"
            f'<td class="best"><b>{best["reward"]:.3f}</b><br>{_e(_cut(best.get("output")))}</td>'
            + (
                f'<td class="worst"><b>{worst["reward"]:.3f}</b><br>{_e(_cut(worst.get("output")))}</td>'
                if worst["reward"] < best["reward"]
                else f'<td class="worst"><i>all {len(answers)} judged answers scored {best["reward"]:.3f}</i></td>'
            )
            + "</tr>"
        )
    head = "<tr><th>step</th><th>doc</th><th>problem</th><th>rubric</th><th>best answer</th><th>worst answer</th></tr>"
    return f'<table class="examples">{head}{"".join(rows)}</table>'


def _text_of(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, list):  # conversation format: the last assistant turn
        turns = [m.get("content", "") for m in x if isinstance(m, dict) and m.get("role") == "assistant"]
        return turns[-1] if turns else ""
    if isinstance(x, dict):
        return str(x.get("content", ""))
    return ""


def pair_stats(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Offline pairs: counts, chosen/rejected lengths and, when the rows carry them, scores."""
    cw = [len(_text_of(p.get("chosen")).split()) for p in pairs]
    rw = [len(_text_of(p.get("rejected")).split()) for p in pairs]
    out: dict[str, Any] = {
        "pairs": len(pairs),
        "chosen length (words), mean": sum(cw) / len(cw) if cw else None,
        "rejected length (words), mean": sum(rw) / len(rw) if rw else None,
        "length difference (words), mean |c−r|": (sum(abs(a - b) for a, b in zip(cw, rw)) / len(cw)) if cw else None,
    }
    for side in ("chosen", "rejected"):
        vals = [_num(p.get(f"{side}_score")) for p in pairs]
        vals = [v for v in vals if v is not None]
        if vals:
            out[f"{side} score, mean"] = sum(vals) / len(vals)
    return out


def _est(e: dict[str, Any] | None, pct: bool = False) -> str:
    if not e or e.get("mean") is None:
        return "—"
    return f"{_fmt(e['mean'], pct)} [{_fmt(e['low'], pct)}, {_fmt(e['high'], pct)}]"


def eval_tables(evals: list[tuple[Path, dict[str, Any], dict[str, Any] | None]]) -> str:
    rows = []
    for _, s, _ in evals:
        h, b = s.get("heldout") or {}, s.get("healthbench") or {}
        for mode in ("greedy", "sampled"):
            if mode in h:
                m = h[mode]
                rows.append(
                    f"<tr><td>{_e(s['label'])}</td><td>held-out {mode}</td><td>{_e(h['num_problems'])}</td>"
                    f"<td>{_est(m['reward'])}</td><td>{_est(m['format_valid_rate'], True)}</td>"
                    f"<td>{_est(m['length_tokens'])}</td><td>{_e(m['judge_failures'])}</td></tr>"
                )
        if b:
            rows.append(
                f"<tr><td>{_e(s['label'])}</td><td>HealthBench-format</td><td>{_e(b['scored'])}/{_e(b['num_conversations'])}</td>"
                f"<td>{_est(b['score'])}</td><td>—</td><td>{_fmt(b['length_tokens_mean'])}</td><td>{_e(b['judge_failures'])}</td></tr>"
            )
    head = (
        "<tr><th>model</th><th>suite</th><th>problems</th><th>reward / score [CI]</th><th>format valid [CI]</th>"
        "<th>length, tokens</th><th>judge failures</th></tr>"
    )
    out = [f'<table class="eval">{head}{"".join(rows)}</table>']
    for _, _, c in evals:
        if not c:
            continue
        crow = []
        items = [(f"held-out {m}", p) for m, p in c.get("heldout", {}).items()]
        if "healthbench" in c:
            items.append(("HealthBench-format", c["healthbench"]))
        for name, p in items:
            crow.append(
                f"<tr><td>{_e(name)}</td><td>{p['n']}</td><td>{_fmt(p['mean_a'])}</td><td>{_fmt(p['mean_b'])}</td>"
                f"<td>{_est(p['diff'])}</td><td>{_est(p['win_rate'], True)}</td>"
                f"<td>{p['wins']}/{p['losses']}/{p['ties']}</td><td>{_fmt(p['sign_test_p'])}</td></tr>"
            )
        chead = (
            "<tr><th>suite</th><th>n</th><th>baseline</th><th>model</th><th>difference [CI]</th>"
            "<th>win rate [CI]</th><th>W/L/T</th><th>sign test p</th></tr>"
        )
        out.append(
            f'<h3>{_e(c["model"])} vs {_e(c["baseline"])}</h3><table class="comparison">{chead}{"".join(crow)}</table>'
        )
    return "".join(out)


# ---------------------------------------------------------------- the page

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.3em .5em;vertical-align:top}
th{background:#f4f4f4}figure{margin:1em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}
table.examples td{max-width:320px;white-space:pre-wrap;word-wrap:break-word}td.best{background:#f1fbf1}td.worst{background:#fdf1f1}
code{font-size:.9em}
"""


def build_report(
    run: Path, out_dir: Path | None = None, eval_dirs: list[Path] | None = None, examples: int = 6
) -> Path:
    """Write ``out_dir/index.html`` and its PNGs (default ``run/report``); return the HTML path."""
    Figure = _require_matplotlib()
    data = load_run(Path(run), eval_dirs)
    out_dir = Path(out_dir) if out_dir else Path(run) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, list[str], bytes]] = []

    def add(name: str, title: str, keys: list[str], fig) -> None:
        png = _png(fig)
        (out_dir / f"{name}.png").write_bytes(png)
        figures.append((name, title, keys, png))

    taken: set[str] = set()
    if data.metrics:
        for name, title, keys, ylabel in FIGURES:
            if name == "stage_seconds":  # every time_* stage the run logged (refit, eval, ...)
                keys = keys[:-1] + [k for k in _time_keys(data) if k not in keys] + keys[-1:]
            add(name, title, keys, _figure(Figure, data, name, title, keys, ylabel))
            taken |= set(keys)
        fig, keys = _eval_figure(Figure, data)
        if fig is not None:
            add("eval", "Held-out evaluation during training", keys, fig)
        other = _other_keys(data, taken)
        for i in range(0, len(other), 16):
            chunk = other[i : i + 16]
            add(f"other_{i // 16 + 1}", "Other metrics", chunk, _grid_figure(Figure, data, chunk, "Other metrics"))
    for k, (d, _, comp) in enumerate(data.evals):
        fig = _comparison_figure(Figure, comp) if comp else None
        if fig is not None:
            add(f"comparison_{k + 1}", f"Paired comparison ({d.name})", [], fig)

    series = {"step": data.steps}
    for _, _, keys, _ in figures:
        for key in keys:
            series[key] = data.series(key)
    payload = json.dumps({"run": str(run), "series": series}, allow_nan=False).replace("</", "<\\/")

    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>pop-nemo report: {_e(Path(run).name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>pop-nemo report: <code>{_e(Path(run).resolve())}</code></h1>",
    ]
    if data.metrics:
        cfg_file = Path(run) / "config.yaml"
        parts.append(
            f"<p>{len(data.metrics)} steps logged"
            + (f"; config in <code>{_e(cfg_file)}</code>" if cfg_file.is_file() else "")
            + ".</p>"
        )
        all_keys = [k for _, _, keys, _ in figures for k in keys]
        parts.append('<h2 id="summary">Summary</h2>' + _summary_table(data, list(dict.fromkeys(all_keys))))
    if figures:
        parts.append('<h2 id="plots">Plots</h2>')
        for name, title, keys, png in figures:
            uri = "data:image/png;base64," + base64.b64encode(png).decode()
            parts.append(
                f'<figure id="fig-{name}" data-metrics="{_e(" ".join(keys))}" data-file="{name}.png">'
                f'<img src="{uri}" alt="{_e(title)}"><figcaption>{_e(title)}'
                + (f" — <code>{_e(', '.join(keys))}</code>" if keys else "")
                + "</figcaption></figure>"
            )
    if data.records:
        parts.append('<h2 id="records">Self-play records</h2>' + _kv_table(records_stats(data.records), "records"))
        parts.append('<h2 id="examples">Example problems, rubrics, best and worst answers</h2>')
        parts.append(examples_table(data.records, examples))
    if data.pairs:
        parts.append('<h2 id="pairs">Offline pairs</h2>' + _kv_table(pair_stats(data.pairs), "pairs"))
    if data.evals:
        parts.append('<h2 id="eval">Evaluations</h2>' + eval_tables(data.evals))
    parts.append(f'<script type="application/json" id="report-data">{payload}</script></body></html>')
    path = out_dir / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
