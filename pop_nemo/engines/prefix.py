"""Planning a prefill that computes each shared prompt prefix once (pure; used by the HF engine).

Self-play prompts repeat themselves: the N solver rows of a problem are one prompt, the N judge
prompts of a problem differ only in the answer at their end, and every prompt of a role starts
with the same system prompt. The HF engine prefills a shared prefix once, copies its KV cache to
the rows that share it, and then prefills only what differs. These functions decide the sharing;
a plan's ``cost`` counts the tokens the forward passes process, padding included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Prompt = Sequence[int]


def common_prefix(a: Prompt, b: Prompt) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def families(prompts: Sequence[Prompt], min_shared: int = 16) -> list[list[int]]:
    """Groups of prompt indices that share at least ``min_shared`` tokens more than all prompts do.

    A family is what a deeper prefix serves (one problem's solver or judge rows); the prefix every
    prompt has (the system prompt) does not make one. Families come in lexicographic order of
    their prompts, indices within a family ascending.
    """
    if not prompts:
        return []
    order = sorted(range(len(prompts)), key=lambda i: (tuple(prompts[i]), i))
    adjacent = [common_prefix(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]
    floor = min(adjacent, default=0) + min_shared
    out = [[order[0]]]
    for idx, lcp in zip(order[1:], adjacent):
        if lcp >= floor:
            out[-1].append(idx)
        else:
            out.append([idx])
    return [sorted(f) for f in out]


def order_rows(prompts: Sequence[Prompt], min_shared: int = 16) -> list[int]:
    """An order that keeps each family together (so it shares within one batch chunk) and
    otherwise sorts by length (so a chunk pads little). Deterministic."""
    fams = families(prompts, min_shared)
    fams.sort(key=lambda f: (max(len(prompts[i]) for i in f), f[0]))
    return [i for f in fams for i in sorted(f, key=lambda i: (len(prompts[i]), i))]


@dataclass(frozen=True)
class PrefillPlan:
    prefix_len: list[int]  # per group: tokens prefilled once for all its rows (>= 1)
    group_of: list[int]  # per row: its group
    cost: int  # tokens processed by the two forward passes, padding included


def _plan(prompts: Sequence[Prompt], groups: list[list[int]]) -> PrefillPlan | None:
    prefix_len, group_of = [], [0] * len(prompts)
    for g, rows in enumerate(groups):
        shared = min(len(prompts[i]) for i in rows) - 1  # every row keeps >= 1 token for its logits
        for a in rows[1:]:
            shared = min(shared, common_prefix(prompts[rows[0]], prompts[a]))
        if shared < 1:
            return None
        prefix_len.append(shared)
        for i in rows:
            group_of[i] = g
    suffix = max(len(p) - prefix_len[group_of[i]] for i, p in enumerate(prompts))
    return PrefillPlan(prefix_len, group_of, cost=len(groups) * max(prefix_len) + len(prompts) * suffix)


def plan_prefill(prompts: Sequence[Prompt], min_shared: int = 16) -> PrefillPlan | None:
    """The cheapest sharing for one batch, or None when a plain padded prefill is as cheap.

    Candidates: one prefix for every row (the system prompt), or one per family (a problem's
    rows, each with its own deeper prefix).
    """
    if len(prompts) < 2:
        return None
    plain = len(prompts) * max(len(p) for p in prompts)
    candidates = [_plan(prompts, [list(range(len(prompts)))]), _plan(prompts, families(prompts, min_shared))]
    best = min((c for c in candidates if c is not None), key=lambda c: c.cost, default=None)
    return best if best is not None and best.cost < plain else None
