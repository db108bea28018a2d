"""The outputs contract (README "Outputs"): the keys of every ``metrics.jsonl`` row and every
``records.jsonl`` line of an online run. One list for the end-to-end tests and the GPU kit
(``bench/gpu/online.py``), so what they check cannot drift apart."""

from __future__ import annotations

# Wall seconds of each self-play stage, the update and the whole step.
STAGE_SECONDS = ("time_propose", "time_solve", "time_rubric", "time_judge", "time_train", "time_step")
METRIC_KEYS = (
    "step",
    "reward_mean",
    "reward_std",
    "solver_format_valid_rate",
    "proposer_valid_rate",
    "rubric_valid_rate",
    "judge_valid_rate",
    "degenerate_group_rate",
    "kl",
    "loss",
    "response_len_mean",
    "tokens_per_s",
    *STAGE_SECONDS,
)
RECORD_KEYS = ("step", "group_id", "doc_id", "document", "problem", "reference", "answers")
ANSWER_KEYS = ("output", "answer", "format_valid", "num_tokens", "finish_reason", "judge_valid", "score", "reward")
# What two runs of the same config may differ in: wall times and rates.
TIMING_KEYS = frozenset({*STAGE_SECONDS, "tokens_per_s", "train_tokens_per_s"})
