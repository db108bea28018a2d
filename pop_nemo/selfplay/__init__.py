"""Self-play: roles (prompts and parsers), rubric scoring, batched stages, records."""
