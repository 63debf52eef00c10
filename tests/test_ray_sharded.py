"""A store split into 2 shards served by Ray actors answers exactly as the single store: the same
hits (exact scan and hnswlib), the same answers and sources, through DocumentMemory, FoTMemoryLLM
and the query engine. A real local Ray cluster, real hnswlib and SQLite, a tiny random model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import BOOK, QUESTION
from fot_memory_plugin import MemoryConfig
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.persistence import MemoryStore, StoreReadOnlyError

pytest.importorskip("ray")
from fot_memory_plugin.distributed import ShardCatalogError, ShardedStore, open_sharded, shard_store  # noqa: E402
from fot_memory_plugin.distributed.catalog import shard_paths  # noqa: E402

CONFIG = MemoryConfig(local_window=64, top_k=8, mem_dtype="float16", retrieval="exact")
LENGTHS = [2400, 1200, 1800, 900]  # characters: the shards get unequal documents, balanced by tokens


@pytest.fixture(scope="module")
def single_store(tmp_path_factory, tiny_model_dir) -> Path:
    book = BOOK.read_text(encoding="utf-8")
    directory = tmp_path_factory.mktemp("single")
    with DocumentMemory.open(directory / "store", model=str(tiny_model_dir), config=CONFIG) as memory:
        start = 0
        for index, length in enumerate(LENGTHS):
            memory.read_text(book[start : start + length], name=f"part{index}.txt")
            start += length
    return directory / "store"


@pytest.fixture(scope="module")
def catalog(single_store, tmp_path_factory) -> Path:
    return shard_store(single_store, 2, tmp_path_factory.mktemp("sharded") / "out")


@pytest.fixture(scope="module")
def sharded(ray_cluster, catalog):
    with ShardedStore.open(catalog) as store:
        yield store



def _without_stamps(record):
    return dataclasses.replace(record, files={name: {key: value for key, value in file.items() if key != "stamp"}
                                              for name, file in record.files.items()})


def test_shard_splits_by_document_and_keeps_ids_and_order(single_store, catalog, sharded):
    _, shards = shard_paths(catalog)
    assert json.loads(catalog.read_text())["shards"] == ["shard-00", "shard-01"]
    with MemoryStore.open(single_store, readonly=True) as store:
        records = store.documents()
        held = []
        for shard in shards:
            with MemoryStore.open(shard, readonly=True) as opened:
                assert opened.verify() == {} and opened.fingerprint == store.fingerprint
                held.append([record.id for record in opened.documents()])
    assert all(held) and sorted(sum(held, [])) == sorted(record.id for record in records)
    # same records (ids, created), same order; each copy's file stamps are its own
    assert [_without_stamps(record) for record in sharded.documents()] == [_without_stamps(r) for r in records]
    assert all(file.get("stamp") for record in sharded.documents() for file in record.files.values())
    assert sharded.num_shards == 2
    with pytest.raises(StoreReadOnlyError):
        sharded.forget("part0.txt")


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "hnswlib"])
def test_sharded_search_returns_the_single_stores_hits(single_store, sharded, exact):
    queries = torch.randn(1, 4, 7, 8, generator=torch.Generator().manual_seed(3))
    with MemoryStore.open(single_store, readonly=True) as store:
        for layer in store.documents()[0].layers:
            for docs in (None, ["part2.txt", "part0.txt"], ["part3.txt"]):
                for k in (8, 5000):  # k beyond the stored tokens: padded, masked
                    # exact_below=0: every document is searched through its hnswlib indexes.
                    local = store.memory(layer, docs, exact=exact, exact_below=0).search(queries, k)
                    remote = sharded.memory(layer, docs, exact=exact, exact_below=0).search(queries, k)
                    for ours, theirs in zip(remote, local):
                        assert torch.equal(ours, theirs)
            memory = sharded.memory(layer)
            ids = torch.tensor([0, len(memory) - 1])
            assert memory.locate(ids) == store.memory(layer).locate(ids)


def test_answers_and_sources_from_two_shard_actors_equal_the_single_store(single_store, catalog, ray_cluster):
    with DocumentMemory.open(single_store, readonly=True) as local, open_sharded(catalog) as remote:
        assert remote.store.num_shards == 2
        for exact in (True, False):
            expected = local.ask(QUESTION, chat=False, max_new_tokens=6, exact=exact)
            got = remote.ask(QUESTION, chat=False, max_new_tokens=6, exact=exact)
            assert got == expected and got.sources
        assert remote.find_sources(QUESTION, chat=False) == local.find_sources(QUESTION, chat=False)
        # Generation through every document's hnswlib indexes (the default reads these short ones exactly).
        prompt = local.engine.encode(QUESTION)
        generated = []
        for memory in (local, remote):
            layers = {layer: memory.store.memory(layer, exact_below=0) for layer in memory.engine.layers}
            memory.engine.reset(layers)
            generated.append(memory.engine.generate(prompt, max_new_tokens=6))
            memory.engine.reset()
        assert torch.equal(generated[0], generated[1])


def test_llm_and_query_engine_accept_a_sharded_memory(single_store, catalog, ray_cluster):
    from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex
    from fot_memory_plugin.integrations.llama_index.llm import FoTMemoryLLM

    with DocumentMemory.open(single_store, readonly=True) as local, open_sharded(catalog) as remote:
        answers = []
        for memory in (local, remote):
            llm = FoTMemoryLLM(document_memory=memory, memory_docs=["part0.txt"], max_new_tokens=6)
            completion = llm.complete(QUESTION)
            response = FoTMemoryIndex(memory).as_query_engine(max_new_tokens=6).query(QUESTION)
            answers.append((completion.text, completion.additional_kwargs["sources"], str(response),
                            [(n.node.text, n.score) for n in response.source_nodes]))
        assert answers[0] == answers[1]


def test_catalogs_that_cannot_be_served_say_why(tmp_path, single_store, ray_cluster):
    with pytest.raises(ShardCatalogError, match="fot-memory shard"):
        ShardedStore.open(tmp_path / "nothing-here")
    (tmp_path / "catalog.json").write_text('{"format": "something else"}')
    with pytest.raises(ShardCatalogError, match="not a shard catalog"):
        ShardedStore.open(tmp_path)
    with pytest.raises(ShardCatalogError, match="not empty"):
        shard_store(single_store, 2, tmp_path)
    with pytest.raises(ValueError, match="fewer than"):
        shard_store(single_store, 9, tmp_path / "new")
    with ShardedStore.open(single_store) as one:  # a plain store is served as one shard
        assert one.num_shards == 1 and len(one.documents()) == len(LENGTHS)


def test_merging_in_the_shards_finds_the_same_top_k_scores(single_store, sharded):
    queries = torch.randn(1, 4, 7, 8, generator=torch.Generator().manual_seed(4))
    with MemoryStore.open(single_store, readonly=True) as store:
        for layer in store.documents()[0].layers:
            for exact in (True, False):
                local = store.memory(layer, exact=exact, exact_below=0).search(queries, 8)
                merged = sharded.memory(layer, exact=exact, exact_below=0, merge_in_shards=True).search(queries, 8)
                assert torch.equal(merged.mask, local.mask)
                # Among keys of equal score another token may be chosen (here often: a random model's
                # layer-0 keys repeat with the token), so compare the scores found, not the ids.
                scores = [(hits.keys * queries[..., None, :]).sum(-1).sort(dim=-1).values for hits in (merged, local)]
                assert torch.equal(scores[0], scores[1])
                assert (merged.token_ids >= 0).all()
