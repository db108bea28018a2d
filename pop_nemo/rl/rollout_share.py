"""Data-parallel self-play: each rank plays its share of a step's documents, rank 0 writes them all.

A step's documents are split across the ranks by whole groups (one group: a document's problem,
its N answers, rubric and judgements), in contiguous shares (:func:`pop_nemo.distributed.shard`),
so every rank runs its own rollout engines on ``docs / world`` documents instead of all of them.
Afterwards each rank's :class:`Share` (token ids and text, never logits) is gathered by every
rank and :func:`merge` puts the groups back in group order: advantages stay per group, the
policy update sees the single-process batch, and the records rank 0 writes are the same whether
1, 2 or 4 ranks generated them (per-request seeds come from seed, step, group and role, not
from the rank). The metrics are the whole step's: counts summed over ranks, stage seconds of the
slowest rank, and each rank's generated tokens (``generated_tokens_rank_<r>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pop_nemo.selfplay.stage import Example


@dataclass
class Share:
    """What one rank brings back from its self-play."""

    examples: list[Example]  # its groups, in group order
    seconds: dict[str, float]  # per stage (propose, solve, rubric, judge)
    generated_tokens: int  # by its own engines
    critic_metrics: dict[str, Any]  # its critic's step_metrics()


@dataclass
class StepRollout:
    """The whole step's self-play, the same on every rank."""

    examples: list[Example]
    seconds: dict[str, float]  # per stage, the slowest rank's: the step waits for it
    generated_tokens: int
    metrics: dict[str, Any]  # per-rank generated tokens (more than one rank), critic counts


def merge(shares: list[Share]) -> StepRollout:
    """Shares in rank order → the step. Contiguous shares make rank order the group order."""
    examples = [e for s in shares for e in s.examples]
    seconds = {k: max(s.seconds.get(k, 0.0) for s in shares) for k in shares[0].seconds}  # same stages on every rank
    metrics: dict[str, Any] = {}
    if len(shares) > 1:
        metrics.update({f"generated_tokens_rank_{r}": s.generated_tokens for r, s in enumerate(shares)})
    metrics.update(merge_critic_metrics([s.critic_metrics for s in shares]))
    return StepRollout(examples, seconds, sum(s.generated_tokens for s in shares), metrics)


def merge_critic_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Each rank's critic counts → the step's (keys of ``CriticClient.step_metrics``).

    Items, failures and requests add up; a replica's latency is the mean over all ranks' requests
    to it; ``critic_replicas_up`` is the fewest any rank saw (a replica one rank lost is down)."""
    if len(per_rank) == 1:  # one rank's numbers pass through as they are (no latency × n / n round trip)
        return dict(per_rank[0])
    out: dict[str, Any] = {}
    for m in per_rank:
        for k, v in m.items():
            if k == "critic_replicas_up":
                out[k] = v if k not in out else min(out[k], v)
            elif not k.startswith("critic_latency_s_"):
                out[k] = out.get(k, 0) + v
    for k in {k for m in per_rank for k in m if k.startswith("critic_latency_s_")}:
        replica = k.removeprefix("critic_latency_s_")
        weighted = [(m[k], m.get(f"critic_requests_{replica}", 0)) for m in per_rank if m.get(k) is not None]
        requests = sum(n for _, n in weighted)
        out[k] = sum(lat * n for lat, n in weighted) / requests if requests else None
    return out
