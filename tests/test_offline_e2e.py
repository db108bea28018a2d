"""Offline POP end to end on CPU with the real SmolLM2-135M and the bundled mini corpus.

* ``pop-nemo synthesize`` of 8 documents with N=4, killed with SIGKILL after its first committed
  chunk and run again: no record lost or duplicated, the committed chunk untouched, the redone
  chunk equal to an uninterrupted computation of it; then ``pop-nemo pairs`` and one epoch of
  ``pop-nemo dpo`` on the result.
* The paper's ablations in-process: comparative scoring (median anchor, round robin), no
  knowledge for the proposer / the rubric writer, and a role played through an OpenAI-compatible
  endpoint (``pop-nemo serve-openai``'s app on loopback, in front of the same real model).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pop_nemo.checkpoint import resume_guard
from pop_nemo.config import load_config
from pop_nemo.selfplay.comparative import (
    anchor_index,
    anchor_score,
    parse_anchor_ratings,
    parse_better,
    round_robin_scores,
)
from pop_nemo.selfplay.knowledge_ablation import NONE_KNOWLEDGE
from pop_nemo.selfplay.synthesis_log import CommitLog
from pop_nemo.selfplay.synthesize import Synthesizer
from tests.conftest import ROOT, RecordingEngine, run_cli

pytestmark = pytest.mark.slow

# 8 documents, N=4, chunks of 4, with the shortest settings that keep every guided output whole
# (conf/offline/tiny_cpu.yaml says which, and why its judge samples).
CONFIG = "conf/offline/tiny_cpu.yaml"
SYNTH = ["--config", CONFIG]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------- unit: scoring modes and the commit log


def test_comparative_scoring_arithmetic():
    assert parse_anchor_ratings("x\n<rating_A>7</rating_A>\n<rating_B>3</rating_B>") == (7.0, 3.0)
    assert parse_anchor_ratings("<rating_A>7</rating_A><rating_A>1</rating_A><rating_B>3</rating_B>") is None
    assert parse_anchor_ratings("<rating_A>seven</rating_A><rating_B>3</rating_B>") is None
    assert (parse_better("<better_answer> a </better_answer>"), parse_better("<better_answer>B</better_answer>")) == (
        1.0,
        0.0,
    )
    assert parse_better("<better_answer>C</better_answer>") is None
    # The anchor is the median-length answer: index len//2 of a stable sort by characters.
    assert anchor_index(["ccc", "a", "bb", "dddd"]) == 0 and anchor_index(["aa", "b", "cc"]) == 0
    # i as A scores 8 vs the anchor's 5; as B, 6 vs 4: mean(3, 2)
    assert anchor_score((8, 5), (4, 6)) == 2.5
    assert anchor_score((8, 5), None) is None
    # 0 beats 1 in both orders, 1 vs 2 split, 0 vs 2 tie without a call, 2 beat 3 in its only parsed comparison
    got = round_robin_scores(4, {(0, 1): [1.0, 1.0], (1, 2): [1.0, 0.0], (0, 2): [0.5], (2, 3): [1.0]})
    assert got == [pytest.approx(2.5 / 3), pytest.approx(1 / 4), pytest.approx(2.5 / 4), 0.0]
    assert round_robin_scores(2, {(0, 1): []}) == [None, None]


def test_commit_log_cuts_an_uncommitted_chunk_and_refuses_changes(tmp_path):
    from pop_nemo.checkpoint import ResumeError
    from pop_nemo.corpus import Document

    docs = [Document(f"d{i}", "text") for i in range(4)]
    guard = {"seed": 1}
    log = CommitLog(tmp_path)
    state = log.open(guard, docs)
    log.commit(state, [{"group_id": 0}, {"group_id": 1}], "d1")
    committed = (tmp_path / "records.jsonl").read_bytes()
    with open(tmp_path / "records.jsonl", "ab") as f:  # a kill in the middle of the next append
        f.write(b'{"group_id": 2}\n{"group_')
    state = log.open(guard, docs)
    assert state.docs_done == 2 and (tmp_path / "records.jsonl").read_bytes() == committed
    with pytest.raises(ResumeError, match="settings that shape the records changed"):
        log.open({"seed": 2}, docs)
    with pytest.raises(ResumeError, match="corpus changed"):
        log.open(guard, [Document("other", "t")] * 4)
    (tmp_path / "records.jsonl").write_bytes(committed[:10])
    with pytest.raises(ResumeError, match="was cut or replaced"):
        log.open(guard, docs)
    (tmp_path / "progress.json").unlink()
    with pytest.raises(ResumeError, match="not written by"):
        log.open(guard, docs)


def test_guard_ignores_what_does_not_shape_records():
    a = resume_guard(load_config("conf/offline/smoke_cpu.yaml"), "synthesize")
    b = resume_guard(
        load_config(
            "conf/offline/smoke_cpu.yaml", ["offline.num_documents=64", "offline.chunk_size=2", "offline.best_of_n=8"]
        ),
        "synthesize",
    )
    c = resume_guard(load_config("conf/offline/smoke_cpu.yaml", ["offline.n=8"]), "synthesize")
    assert a == b and a != c


# ---------------------------------------------------------------- end to end through the CLI


def test_synthesize_kill9_resume_pairs_dpo(tmp_path, hf_model, tokenizer):
    out = tmp_path / "synth"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pop_nemo.cli", "synthesize", *SYNTH, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = out / "progress.json"
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.is_file() and json.loads(progress.read_text())["docs_done"] >= 4:
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"synthesize ended before it could be killed:\n{proc.stdout.read()}"
        time.sleep(3)  # the second chunk is being generated
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    state = json.loads(progress.read_text())
    assert state["docs_done"] == 4
    first_chunk = (out / "records.jsonl").read_bytes()[: state["records_bytes"]]
    assert len(first_chunk.splitlines()) == 4

    rerun = run_cli("synthesize", *SYNTH, "--output-dir", str(out), env={"COLUMNS": "1000"})
    assert "resuming after 4 committed documents" in rerun.stderr
    lines = _lines(out / "records.jsonl")
    records = [json.loads(x) for x in lines]
    cfg = load_config(CONFIG)
    from pop_nemo import build

    docs = build.build_corpus(cfg).take(8)
    assert [r["group_id"] for r in records] == list(range(8))  # none lost, none duplicated
    assert [r["doc_id"] for r in records] == [d.id for d in docs]
    assert (out / "records.jsonl").read_bytes().startswith(first_chunk)  # the committed chunk is untouched
    assert all(len(r["answers"]) >= 4 and r["task"] == "health_care" for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["documents"] == 8 and summary["answers"] == sum(len(r["answers"]) for r in records)
    assert summary["scored"] == sum(a["judge_valid"] is True for r in records for a in r["answers"])

    # The redone chunk is what an uninterrupted run computes for it (same seeds, same batches).
    from pop_nemo.engines.hf import HFEngine

    engine = HFEngine(hf_model, tokenizer, max_batch=cfg.rollout.max_batch, seed=cfg.seed)
    synth = Synthesizer(cfg, dict.fromkeys(("proposer", "solver", "rubric", "judge"), engine))
    examples, _ = synth.run(docs[4:], first_group_id=4)
    assert [json.dumps(r, ensure_ascii=False) for r in synth.records(examples)] == lines[4:]

    # pairs → DPO, one epoch.
    res = run_cli(
        "pairs", "--input", str(out / "records.jsonl"), "--output", str(out / "pairs.jsonl"), env={"COLUMNS": "1000"}
    )
    stats = json.loads((out / "pairs.stats.json").read_text())
    assert "dropped: scores_tied" in res.stderr and stats["records"] == 8
    pairs = [json.loads(x) for x in _lines(out / "pairs.jsonl")]
    # A 135M judge rates most answers alike, but not all (seeds fixed: this is deterministic).
    assert len(pairs) == stats["pairs"] >= 1, stats
    for p in pairs:
        assert [m["role"] for m in p["prompt"]] == ["system", "user"] and p["chosen_score"] > p["rejected_score"]
    run_dir = tmp_path / "dpo"
    run_cli(
        "dpo",
        "--config",
        "conf/offline/dpo_smoke_cpu.yaml",
        "--pairs",
        str(out / "pairs.jsonl"),
        "--output-dir",
        str(run_dir),
        "logging.tensorboard=false",
        "logging.progress=false",
        "dpo.max_length=320",
        "dpo.max_prompt_length=192",
    )
    rows = [json.loads(x) for x in _lines(run_dir / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    held_out = 1 if len(pairs) >= 2 else 0  # ceil(4% of n) for n <= 25; none when it would leave no training pair
    steps = -(-(len(pairs) - held_out) // 4)  # batch 4, one epoch
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    assert train_rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at first
    assert all(set(r) >= {"reward_margin", "reward_accuracy", "reward_chosen", "grad_norm", "lr"} for r in train_rows)
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["eval_pairs"] == held_out and result["train_pairs"] == len(pairs) - held_out
    assert ("eval_loss" in rows[-1]) == bool(held_out)
    assert (run_dir / "final_model" / "config.json").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{len(train_rows):06d}"


# ---------------------------------------------------------------- ablations, in-process on the real model


def _ablation_cfg(*extra: str):
    return load_config(
        CONFIG, ["offline.n=2", "rollout.judge.temperature=0.0", "rollout.judge.max_new_tokens=80", *extra]
    )


@pytest.fixture
def openai_server(engine):
    """``pop-nemo serve-openai``'s app (pop_nemo.engines.openai_server) on loopback, in a thread,
    serving the same real model; ``requests`` holds what reached its engine."""
    import socket

    import uvicorn

    from pop_nemo.engines.openai_server import OpenAIService, ServeOpenAIConfig, create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    served = RecordingEngine(engine)
    service = OpenAIService(load=lambda: served, cfg=ServeOpenAIConfig(model_name="teacher-model", port=port))
    server = uvicorn.Server(
        uvicorn.Config(create_app(service, token="sk-test"), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (server.started and service.state == "ready"):
        assert time.monotonic() < deadline and thread.is_alive(), "the OpenAI-compatible server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/v1", served.requests
    server.should_exit = True
    thread.join(timeout=30)


def test_median_anchor_with_a_teacher_judge_and_no_knowledge(engine, openai_server, monkeypatch):
    url, served = openai_server
    monkeypatch.setenv("POP_TEST_KEY", "sk-test")
    cfg = _ablation_cfg(
        "offline.scoring=median_anchor",
        "offline.proposer_knowledge=false",
        f"offline.teacher.url={url}",
        "offline.teacher.model=teacher-model",
        "offline.teacher.roles=[judge]",
        "offline.teacher.api_key_env=POP_TEST_KEY",
        "offline.teacher.guide_format=trtllm",
    )
    from pop_nemo import build

    own = RecordingEngine(engine)
    teacher = build.endpoint_engine(cfg.offline.teacher)
    synth = Synthesizer(cfg, {"proposer": own, "solver": own, "rubric": own, "judge": teacher})
    doc = build.build_corpus(cfg).take(1)
    examples, _ = synth.run(doc, first_group_id=0)
    (e,) = examples
    rec = synth.records(examples)[0]
    assert (
        rec["document"] == doc[0].text
        and rec["roles"]["judge"] == "teacher-model"
        and rec["scoring"] == "median_anchor"
    )
    # The proposer saw "None" instead of the document; so did the rubric writer, and the reference too.
    prompts = [r.messages[-1]["content"] for r in own.requests]
    assert f"<knowledge>\n{NONE_KNOWLEDGE}\n</knowledge>" in prompts[0] and doc[0].text not in "".join(prompts)
    rubric_prompt = next(p for p in prompts if "<candidate_answers>" in p)
    assert f"<reference_answer>\n{NONE_KNOWLEDGE}\n</reference_answer>" in rubric_prompt
    assert e.proposer_valid and e.rubric_valid, rec
    judged = [a for a in e.answers if a.answer is not None]
    # Every judged answer went to the endpoint twice (as A and as B against the anchor), with its
    # guide (sent as trtllm-serve's response_format), sampling and seed intact.
    assert len(served) == 2 * len(judged)
    for r in served:
        assert r.sampling.guide is not None and r.sampling.guide.kind == "ebnf"
        assert r.sampling.n == 1 and r.sampling.temperature == 0.0 and r.sampling.seed is not None
        assert "<candidate_answer_A>" in r.messages[-1]["content"]
    for a in judged:
        assert a.judgement.valid, a.judgement  # the guide makes both ratings parse
        assert -10 <= a.judgement.score <= 10 and a.judgement.reward == pytest.approx((a.judgement.score + 10) / 20)
    teacher.close()


def test_pairwise_round_robin_and_blind_rubric_writer(engine):
    cfg = _ablation_cfg("offline.scoring=pairwise", "offline.rubric_knowledge=false")
    from pop_nemo import build

    own = RecordingEngine(engine)
    synth = Synthesizer(cfg, dict.fromkeys(("proposer", "solver", "rubric", "judge"), own))
    doc = build.build_corpus(cfg).take(1)
    (e,), _ = synth.run(doc, first_group_id=0)
    prompts = [r.messages[-1]["content"] for r in own.requests]
    assert doc[0].text in prompts[0]  # the proposer keeps the document
    rubric_prompt = next(p for p in prompts if "<candidate_answers>" in p)
    assert f"<knowledge>\n{NONE_KNOWLEDGE}\n</knowledge>" in rubric_prompt and doc[0].text not in rubric_prompt
    assert e.rubric_valid
    judged = [a for a in e.answers if a.answer is not None]
    comparisons = [p for p in prompts if "<candidate_answer_A>" in p]
    distinct = judged[0].answer.strip() != judged[1].answer.strip()
    assert len(comparisons) == (2 if distinct else 0)
    scores = [a.judgement.score for a in judged]
    assert all(a.judgement.valid for a in judged) and all(0 <= s <= 1 for s in scores)
    assert sum(scores) == pytest.approx(1.0)  # two answers: win rates add up to one
