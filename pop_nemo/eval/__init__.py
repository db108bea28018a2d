"""Evaluation and run reports: held-out self-play eval, HealthBench-format rubric benchmarks,
bootstrap statistics, and ``pop-nemo report`` (see docs/EVAL.md)."""
