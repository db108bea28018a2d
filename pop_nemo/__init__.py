"""pop_nemo: rubric-based self-play on pretraining text (POP), online and offline."""

__version__ = "0.1.0"
