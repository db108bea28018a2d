"""Documents for self-play: mini corpus, local files, determinism, sharding, resumable cursor."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from pop_nemo.corpus import Corpus, CorpusError, truncate_words


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def seven_docs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "seven.jsonl", [{"id": f"d{i}", "text": words(50 + i, f"d{i}_")} for i in range(7)])


def ids(docs) -> list[str]:
    return [d.id for d in docs]


# ---------------------------------------------------------------- the bundled mini corpus


def test_mini_corpus_skips_short_documents():
    text = (resources.files("pop_nemo") / "data" / "mini_corpus.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    long_ids = {r["id"] for r in rows if len(r["text"].split()) >= 50}
    short_ids = {r["id"] for r in rows} - long_ids
    assert short_ids, "the mini corpus should hold a short document, to exercise the filter"
    corpus = Corpus(seed=0)
    assert len(corpus) >= 60
    assert set(ids(corpus.documents)) == long_ids
    assert all(len(d.text.split()) >= 50 for d in corpus.documents)


def test_mini_corpus_domain_filter():
    health = Corpus(domains=["health"])
    assert health.documents and all(d.id.startswith("health-") for d in health.documents)
    both = Corpus(domains=["health", "books"])
    assert len(both) > len(health) and set(ids(health.documents)) < set(ids(both.documents))


def test_mini_corpus_max_words_truncates():
    corpus = Corpus(max_words=20)
    for d in corpus.documents:
        assert len(d.text.split()) == 20
    full = {d.id: d.text for d in Corpus().documents}
    d = corpus.documents[0]
    assert d.text == " ".join(full[d.id].split()[:20])


# ---------------------------------------------------------------- min/max words


def test_min_and_max_words_boundaries(tmp_path):
    src = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "49", "text": words(49)},
            {"id": "50", "text": words(50)},
            {"id": "60", "text": "  " + words(60).replace(" ", "\n ", 1)},
            {"id": "notext", "text": None},
            {"id": "num", "text": 12345},
        ],
    )
    corpus = Corpus(str(src), min_words=50, max_words=55)
    assert ids(corpus.documents) == ["50", "60"]
    docs = {d.id: d.text for d in corpus.documents}
    assert docs["50"] == words(50)  # not over the cap: text kept as written
    assert docs["60"] == words(55)  # cut to the first 55 whitespace words, joined by spaces


def test_truncate_words():
    assert truncate_words("a  b\tc\nd", 2) == "a b"
    assert truncate_words("a  b\tc", 3) == "a  b\tc"


# ---------------------------------------------------------------- determinism and sharding


def test_same_seed_same_order_and_each_epoch_is_a_permutation():
    a, b = Corpus(seed=11), Corpus(seed=11)
    n = len(a)
    first = ids(a.take(2 * n))
    assert first == ids(b.take(2 * n))
    assert sorted(first[:n]) == sorted(ids(a.documents))  # every document once per epoch
    assert sorted(first[n:]) == sorted(ids(a.documents))
    assert first[:n] != first[n:]  # a new shuffle each epoch


def test_different_seeds_differ():
    assert ids(Corpus(seed=1).take(20)) != ids(Corpus(seed=2).take(20))


@pytest.mark.parametrize("world_size", [2, 3])
def test_data_parallel_ranks_are_disjoint_and_cover_the_corpus(world_size):
    everything = set(ids(Corpus(seed=5).documents))
    shards = []
    for rank in range(world_size):
        c = Corpus(seed=5, rank=rank, world_size=world_size)
        per_epoch = len(c._order)
        shards.append(ids(c.take(per_epoch)))
        assert len(set(shards[-1])) == per_epoch
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not set(shards[i]) & set(shards[j])
    assert set().union(*map(set, shards)) == everything
    assert sum(map(len, shards)) == len(everything)


def test_rank_outside_world_and_too_few_documents(tmp_path):
    with pytest.raises(CorpusError, match="rank 2 is outside world size 2"):
        Corpus(rank=2, world_size=2)
    src = write_jsonl(tmp_path / "two.jsonl", [{"text": words(60)}, {"text": words(60)}])
    with pytest.raises(CorpusError, match="has 2 documents of at least 50 words; need at least one per rank \\(3\\)"):
        Corpus(str(src), world_size=3)


# ---------------------------------------------------------------- resumable cursor


@pytest.mark.parametrize("consumed", [3, 7, 12])  # mid-epoch, exactly at the boundary, in epoch 1
def test_cursor_restore_continues_identically(tmp_path, consumed):
    src = str(seven_docs(tmp_path))
    straight = ids(Corpus(src, seed=9).take(consumed + 20))
    first = Corpus(src, seed=9)
    head = ids(first.take(consumed))
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = Corpus(src, seed=9)
    resumed.load_state_dict(state)
    assert head + ids(resumed.take(20)) == straight  # crosses at least two epoch boundaries
    first.take(20)
    assert resumed.state_dict() == first.state_dict()
    assert resumed.state_dict()["epoch"] == (consumed + 20 - 1) // 7  # the epoch advances on the next draw


def test_state_of_another_corpus_is_rejected(tmp_path):
    seven = Corpus(str(seven_docs(tmp_path)), seed=9)
    with pytest.raises(CorpusError, match="cursor is for 7 documents with seed 9.*the corpus or seed changed"):
        Corpus(seed=9).load_state_dict(seven.state_dict())
    with pytest.raises(CorpusError, match="seed 10"):
        Corpus(str(seven_docs(tmp_path)), seed=10).load_state_dict(seven.state_dict())


# ---------------------------------------------------------------- local sources


def test_jsonl_source_with_ids(tmp_path):
    src = seven_docs(tmp_path)
    corpus = Corpus(str(src))
    assert sorted(ids(corpus.documents)) == [f"d{i}" for i in range(7)]
    assert {d.id: d.text for d in corpus.documents}["d3"] == words(53, "d3_")


def test_id_falls_back_to_file_and_row(tmp_path):
    src = write_jsonl(tmp_path / "noid.jsonl", [{"text": words(10)}, {"text": words(60)}])
    assert ids(Corpus(str(src)).documents) == ["noid.jsonl:1"]
    assert ids(Corpus(str(src), id_field=None).documents) == ["noid.jsonl:1"]


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "c"], "body": [words(70), words(5), words(80)]}), path)
    corpus = Corpus(str(path), text_field="body", id_field="key")
    assert sorted(ids(corpus.documents)) == ["a", "c"]
    assert {d.id: d.text for d in corpus.documents}["c"] == words(80)


def test_txt_source_is_one_document_per_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(f"{words(60, 'x')}\n\n{words(3)}\n{words(55, 'y')}\n", encoding="utf-8")
    corpus = Corpus(str(path))
    assert sorted(d.text for d in corpus.documents) == [words(60, "x"), words(55, "y")]


def test_folder_source_reads_all_supported_files(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl", [{"id": "j1", "text": words(60)}])
    write_jsonl(folder / "sub" / "b.json", [{"id": "j2", "text": words(61)}])
    (folder / "sub" / "c.txt").write_text(words(62, "t") + "\n", encoding="utf-8")
    (folder / "README.md").write_text(words(100), encoding="utf-8")  # not a corpus file
    corpus = Corpus(str(folder))
    assert len(corpus) == 3
    assert {"j1", "j2"} <= set(ids(corpus.documents))
    assert words(62, "t") in {d.text for d in corpus.documents}


def test_folder_without_corpus_files(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(CorpusError, match="holds no .jsonl, .json, .parquet or .txt files"):
        Corpus(str(tmp_path))


def test_missing_text_field_names_it_and_lists_fields(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "body": words(60), "title": "t"}])
    with pytest.raises(
        CorpusError, match=r"corpus.text_field='text' is not a field of .*fields are \['body', 'id', 'title'\]"
    ):
        Corpus(str(src))


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=f"{name}' is empty"):
        Corpus(str(tmp_path / name))


def test_only_short_documents(tmp_path):
    src = write_jsonl(tmp_path / "short.jsonl", [{"text": words(10)}])
    with pytest.raises(CorpusError, match="0 documents of at least 50 words"):
        Corpus(str(src))


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_non_utf8_file_is_named(tmp_path, name):
    path = tmp_path / name
    body = words(60) + " caf\xe9"  # é in latin-1 is byte 0xe9, invalid UTF-8 here
    if name.endswith(".jsonl"):
        body = '{"text": "' + body + '"}\n'
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(CorpusError, match=f"{name} is not UTF-8"):
        Corpus(str(path))


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": words(60)}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="bad.jsonl:2: not valid JSON"):
        Corpus(str(path))


def test_missing_local_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        Corpus(str(tmp_path / "nope.jsonl"))
    with pytest.raises(CorpusError, match="does not exist"):
        Corpus("./no/such/folder")


def test_max_documents(tmp_path):
    rows = [{"id": f"d{i}", "text": words(60 if i != 3 else 5)} for i in range(12)]  # d3 is short
    src = str(write_jsonl(tmp_path / "c.jsonl", rows))
    a = Corpus(src, seed=1, max_documents=4)
    assert len(a) == 4
    assert "d3" not in ids(a.documents)
    assert set(ids(a.documents)) < {f"d{i}" for i in range(12)}
    order = [f"d{i}" for i in range(12)]
    assert ids(a.documents) == sorted(ids(a.documents), key=order.index)  # file order kept
    assert ids(Corpus(src, seed=1, max_documents=4).documents) == ids(a.documents)  # deterministic
    assert len(Corpus(src, max_documents=100)) == 11  # more than there are: all of them


def test_exclude_ids(tmp_path):
    src = str(seven_docs(tmp_path))
    assert sorted(ids(Corpus(src, exclude_ids={"d0", "d6"}).documents)) == [f"d{i}" for i in range(1, 6)]


def test_json_array_file(tmp_path):
    """A .json file may hold one array of objects (pretty-printed or not), as HF's json loader reads."""
    rows = [{"id": "a", "text": words(60)}, {"id": "b", "text": words(70)}]
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (tmp_path / "flat.json").write_text(json.dumps(rows), encoding="utf-8")
    for name in ("pretty.json", "flat.json"):
        assert sorted(ids(Corpus(str(tmp_path / name)).documents)) == ["a", "b"]


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": words(60)}) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="c.jsonl: line 2 is not a JSON object"):
        Corpus(str(path))


def test_jsonl_text_with_unicode_line_separator(tmp_path):
    text = words(30) + "\u2028" + words(30, "v")  # a valid character inside a JSON string
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "u", "text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert Corpus(str(path)).documents[0].text == text
