"""`pop-nemo report`: the HTML opens, every figure is a real PNG, every metric the issue lists is plotted
from the run's own numbers (the real 2-step SmolLM2 run of tests/test_eval_e2e.py)."""

from __future__ import annotations

import base64
import html
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli as _run_cli
from tests.outputs_contract import METRIC_KEYS
from tests.test_eval_e2e import ensure_run


def run_cli(*args, **kw):
    """``pop-nemo`` as a process, with a console wide enough that messages are never wrapped."""
    return _run_cli(*args, env={"COLUMNS": "1000"}, **kw)


# The issue's list: reward mean/std, validity per role, KL, loss, lengths, tokens/s, stage seconds
# (every metric of the outputs contract but the step and the degenerate-group rate), judge failure
# counts; plus the in-loop evaluation.
REQUIRED = [k for k in METRIC_KEYS if k not in ("step", "degenerate_group_rate")] + ["judge_failures", "judge_timeouts"]


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures: list[dict] = []
        self.ids: set[str] = set()
        self.data: str | None = None
        self._in_data = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "figure":
            self.figures.append({"metrics": (a.get("data-metrics") or "").split(), "file": a.get("data-file")})
        elif tag == "img" and self.figures:
            self.figures[-1]["src"] = a["src"]
        elif tag == "script" and a.get("id") == "report-data":
            self._in_data = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.data = (self.data or "") + data
        else:
            self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def check_png(png: bytes, on_disk: Path) -> None:
    import matplotlib.image as mpimg

    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG" and img.width >= 400 and img.height >= 200
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 100, "a blank image"
    assert on_disk.read_bytes() == png  # the PNG next to the page is the embedded one
    assert mpimg.imread(on_disk).shape[:2] == (img.height, img.width)


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_report_of_a_real_run_shows_every_metric(tmp_path_factory):
    run = ensure_run(tmp_path_factory).dir
    proc = run_cli("report", "--run", str(run), timeout=300)
    index = run / "report" / "index.html"
    assert str(index) in proc.stderr + proc.stdout
    page = parse(index)
    plotted = {m for f in page.figures for m in f["metrics"]}
    missing = [m for m in REQUIRED if m not in plotted]
    assert not missing, f"not plotted: {missing}"
    assert {"eval/greedy/reward", "eval/sampled/reward", "eval/healthbench/score"} <= plotted
    for f in page.figures:
        assert f["src"].startswith("data:image/png;base64,")
        check_png(base64.b64decode(f["src"].split(",", 1)[1]), index.parent / f["file"])

    # the plotted series are the run's own numbers
    data = json.loads(page.data)["series"]
    metrics, records = rows(run / "metrics.jsonl"), rows(run / "records.jsonl")
    assert data["step"] == [m["step"] for m in metrics]
    for key in plotted - {"judge_failures"}:
        assert data[key] == [m.get(key) for m in metrics], key
    failures = [
        sum(a["judge_valid"] is False for r in records if r["step"] == m["step"] for a in r["answers"]) for m in metrics
    ]
    assert data["judge_failures"] == failures

    text = html.unescape(" ".join(page.text))
    assert {"summary", "plots", "records", "examples"} <= page.ids
    shown = [r for r in records if r["rubric_valid"] and any(a["judge_valid"] for a in r["answers"])]
    for r in shown:  # a table of example problems with their rubrics and best/worst answers
        assert r["problem"] in text
        assert all(c["name"] in text for c in r["rubric"])
        best = max((a for a in r["answers"] if a["judge_valid"]), key=lambda a: a["reward"])
        assert best["output"][:200] in text
    if not shown:
        assert "No example has a valid rubric" in text
    assert f"{len(records)}" in text


def hand_run(tmp_path: Path) -> Path:
    """An offline-style folder: records without steps, chosen/rejected pairs, DPO metrics."""
    run = tmp_path / "offline"
    run.mkdir()
    rec = {
        "group_id": 0,
        "doc_id": "d<1>",
        "problem": "Why is <b>the</b> sky blue?",
        "reference": "Rayleigh scattering.",
        "proposer_valid": True,
        "rubric_valid": True,
        "rubric": [{"name": "Physics", "gold": "Rayleigh", "description": "names the effect", "weight": 2.0}],
        "answers": [
            {"output": "Because of Rayleigh scattering.", "format_valid": True, "judge_valid": True, "reward": 1.0},
            {"output": "Because it reflects the sea.", "format_valid": False, "judge_valid": True, "reward": 0.0},
            {"output": "???", "format_valid": False, "judge_valid": False, "reward": None},
        ],
    }
    tied = {**rec, "doc_id": "d2", "problem": "Name a prime.", "answers": [
        {"output": "Two.", "format_valid": True, "judge_valid": True, "reward": 0.5},
        {"output": "Three.", "format_valid": True, "judge_valid": True, "reward": 0.5},
    ]}  # fmt: skip
    (run / "records.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(tied) + "\n")
    pairs = [
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a b c"}],
         "rejected": [{"role": "assistant", "content": "a"}], "chosen_score": 2.0, "rejected_score": 0.5},
        {"prompt": "q2", "chosen": "x y", "rejected": "x y z w", "chosen_score": 1.0, "rejected_score": 0.0},
    ]  # fmt: skip
    (run / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    metrics = [{"step": s, "dpo_loss": 0.7 - 0.1 * s, "reward_accuracy": 0.5 + 0.1 * s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


def test_report_of_an_offline_run_shows_pairs_and_other_metrics(tmp_path):
    from pop_nemo.run_report import build_report

    run = hand_run(tmp_path)
    page = parse(build_report(run, tmp_path / "out"))
    text = html.unescape(" ".join(page.text))
    assert "pairs" in page.ids
    assert "Why is <b>the</b> sky blue?" in text  # escaped in the page, intact to a reader
    assert "<b>the</b>" not in (tmp_path / "out" / "index.html").read_text().split('<h2 id="examples"')[1][:2000]
    assert "Because of Rayleigh scattering." in text and "Because it reflects the sea." in text
    assert "all 2 judged answers scored 0.500" in text and "Three." not in text  # a tie has no worst answer
    assert "chosen length (words), mean" in text and "2.5" in text  # (3 + 2) / 2
    assert "chosen score, mean" in text and "1.5" in text
    plotted = {m for f in page.figures for m in f["metrics"]}
    assert {"dpo_loss", "reward_accuracy"} <= plotted
    for f in page.figures:
        check_png(base64.b64decode(f["src"].split(",", 1)[1]), tmp_path / "out" / f["file"])


def test_report_includes_evaluations_and_their_paired_comparison(tmp_path):
    from pop_nemo.run_report import build_report

    est = {"mean": 0.6, "low": 0.4, "high": 0.8, "n": 5}
    mode = {"reward": est, "format_valid_rate": est, "length_tokens": {**est, "mean": 31.0}, "judge_failures": 1}
    ev = tmp_path / "ev"
    ev.mkdir()
    summary = {"label": "ckpt-7", "heldout": {"num_problems": 5, "num_documents": 6, "greedy": mode}}
    (ev / "summary.json").write_text(json.dumps(summary))
    paired = {
        "n": 5, "mean_a": 0.4, "mean_b": 0.6, "wins": 3, "losses": 1, "ties": 1, "sign_test_p": 0.625,
        "diff": {"mean": 0.2, "low": -0.05, "high": 0.45, "n": 5},
        "win_rate": {"mean": 0.7, "low": 0.4, "high": 1.0, "n": 5},
    }  # fmt: skip
    (ev / "comparison.json").write_text(
        json.dumps({"baseline": "base", "model": "ckpt-7", "heldout": {"greedy": paired}})
    )
    page = parse(build_report(hand_run(tmp_path), tmp_path / "out", [ev]))
    text = html.unescape(" ".join(page.text))
    assert "eval" in page.ids and "ckpt-7 vs base" in text
    assert "0.6 [0.4, 0.8]" in text and "3/1/1" in text and "70.0% [40.0%, 100.0%]" in text
    comp = [f for f in page.figures if f["file"].startswith("comparison")]
    assert len(comp) == 1
    check_png(base64.b64decode(comp[0]["src"].split(",", 1)[1]), tmp_path / "out" / comp[0]["file"])


def test_report_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_cli("report", "--run", str(empty), check=False, timeout=120)
    assert bad.returncode == 2 and "is it a pop-nemo run" in bad.stderr
    bad = run_cli("report", "--run", str(hand_run(tmp_path)), "--eval", str(empty), check=False, timeout=120)
    assert bad.returncode == 2 and "holds no summary.json" in bad.stderr
