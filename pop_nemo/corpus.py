"""Documents for self-play: the bundled mini corpus, local files, or a Hugging Face dataset.

Deterministic given the seed, sharded by data-parallel rank, and resumable: the cursor (epoch
and position in this rank's shuffled order) is saved in every checkpoint. Documents under
``min_words`` whitespace words are skipped; the rest are cut to their first ``max_words``.

The corpus owns document ids and the held-out split: a document is held out for evaluation
when ``split_point(id, salt) < heldout_fraction``, a property of its id alone, so the split is
the same for every seed, rank, corpus size and run. Training never sees those documents;
:meth:`Corpus.heldout_documents` hands them to the evaluation (``pop_nemo.eval.heldout``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pop_nemo.jsonl import parse_lines

MINI = "mini"
TEXT_SUFFIXES = {".jsonl", ".json", ".parquet", ".txt"}


class CorpusError(ValueError):
    pass


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def split_point(doc_id: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the document id (and the salt)."""
    digest = hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(doc_id: str, fraction: float, salt: str) -> bool:
    return split_point(doc_id, salt) < fraction


def truncate_words(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON Lines; a ``.json`` file may also hold one JSON array of objects (as HF's json loader reads)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text (byte {e.start}); convert it with `iconv -t utf-8`") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        numbered = list(enumerate(items, 1))
        where = "item"
    else:
        numbered = list(parse_lines(text, path, CorpusError))
        where = "line"
    for n, row in numbered:
        if not isinstance(row, dict):
            raise CorpusError(f"{path}: {where} {n} is not a JSON object with a text field")
    return [row for _, row in numbered]


def _read_local(path: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"corpus.source={str(path)!r} holds no .jsonl, .json, .parquet or .txt files")
    rows: list[dict[str, Any]] = []
    for f in files:
        if f.suffix in {".jsonl", ".json"}:
            rows.extend(_read_jsonl(f))
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(f).to_pylist())
        else:  # plain text: one document per line, as the HF "text" loader does
            try:
                rows.extend({"text": line} for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
            except UnicodeDecodeError as e:
                raise CorpusError(f"{f} is not UTF-8 text (byte {e.start}); convert it with `iconv -t utf-8`") from None
    return rows


def _read_mini(domains: list[str] | None) -> list[dict[str, Any]]:
    path = resources.files("pop_nemo") / "data" / "mini_corpus.jsonl"
    rows = [row for _, row in parse_lines(path.read_text(encoding="utf-8"), "mini corpus")]
    if domains:
        rows = [r for r in rows if r.get("domain") in domains]
    return rows


def _read_hub(name: str, split: str, config: str | None, limit: int | None, seed: int) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types; the user needs the id and the cause
        raise CorpusError(f"could not load dataset {name!r} (split {split!r}): {e}") from e
    if limit and len(ds) > limit:
        # Arrow select is lazy: a 4k-document run never materialises a 8M-row corpus.
        ds = ds.shuffle(seed=seed).select(range(limit))
    return list(ds)


def load_rows(
    source: str, split: str, config: str | None, domains: list[str] | None, limit: int | None, seed: int
) -> list[dict[str, Any]]:
    """The raw rows of ``source``: the mini corpus, a local file or folder, or a hub dataset."""
    if source == MINI:
        return _read_mini(domains)
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(path)
    if source.startswith((".", "/", "~")) or Path(source).suffix in TEXT_SUFFIXES:
        raise CorpusError(f"corpus.source={source!r} does not exist")
    return _read_hub(source, split, config, limit, seed)


class Corpus:
    """An endless, deterministic stream of documents for one data-parallel rank."""

    def __init__(
        self,
        source: str = MINI,
        text_field: str = "text",
        id_field: str | None = "id",
        split: str = "train",
        config: str | None = None,
        domains: list[str] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        min_words: int = 50,
        max_words: int = 1024,
        exclude_ids: set[str] | None = None,
        max_documents: int | None = None,
        heldout_fraction: float = 0.0,
        split_salt: str = "",
    ):
        if not 0 <= rank < world_size:
            raise CorpusError(f"rank {rank} is outside world size {world_size}")
        self.source, self.text_field, self.id_field = source, text_field, id_field
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.min_words, self.max_words = min_words, max_words
        # Oversample hub rows 2x so that skipping short documents still leaves max_documents.
        rows = load_rows(source, split, config, domains, 2 * max_documents if max_documents else None, seed)
        if not rows:
            raise CorpusError(f"corpus.source={source!r} is empty")
        if not any(text_field in r for r in rows[:100]):
            found = sorted({k for r in rows[:100] for k in r})
            raise CorpusError(f"corpus.text_field={text_field!r} is not a field of {source!r}; fields are {found}")
        self._docs: list[Document] = []
        self._heldout: list[Document] = []
        self.heldout_ids: set[str] = set()  # every held-out row's id, long enough or not
        for i, r in enumerate(rows):
            doc_id = str(r[id_field]) if id_field and r.get(id_field) is not None else f"{Path(source).name}:{i}"
            held = heldout_fraction > 0 and is_heldout(doc_id, heldout_fraction, split_salt)
            if held:
                self.heldout_ids.add(doc_id)
            text = r.get(text_field)
            if not isinstance(text, str) or len(text.split()) < min_words:
                continue
            if held:
                self._heldout.append(Document(doc_id, truncate_words(text, max_words)))
            elif not (exclude_ids and doc_id in exclude_ids):
                self._docs.append(Document(doc_id, truncate_words(text, max_words)))
        self._heldout.sort(key=lambda d: (split_point(d.id, split_salt), d.id))
        if max_documents and len(self._docs) > max_documents:
            keep = sorted(random.Random(f"{seed}:select").sample(range(len(self._docs)), max_documents))
            self._docs = [self._docs[i] for i in keep]
        if len(self._docs) < world_size:
            raise CorpusError(
                f"corpus.source={source!r} has {len(self._docs)} documents of at least {min_words} words; "
                f"need at least one per rank ({world_size})"
            )
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def documents(self) -> list[Document]:
        return list(self._docs)

    def heldout_documents(self) -> list[Document]:
        """The held-out documents that pass the word filter, in split order (so a larger
        evaluation set extends the same list); the same on every rank."""
        return list(self._heldout)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self._docs)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[self.rank :: self.world_size]

    def next(self) -> Document:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._shuffled(self.epoch)
        doc = self._docs[self._order[self.position]]
        self.position += 1
        return doc

    def take(self, n: int) -> list[Document]:
        return [self.next() for _ in range(n)]

    def __iter__(self) -> Iterator[Document]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_docs": len(self._docs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_docs") != len(self._docs) or state.get("seed") != self.seed:
            raise CorpusError(
                f"the checkpoint's corpus cursor is for {state.get('num_docs')} documents with seed {state.get('seed')}, "
                f"but this corpus has {len(self._docs)} with seed {self.seed}: the corpus or seed changed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)
