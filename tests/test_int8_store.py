"""int8 stores (kvfile: each key and value vector quantized by its own float16 scale): the round
trip's error is bounded, a document takes about half of float16's bytes, its indexes search it
as exactly as float16's, damage is found before it answers, and a model's store reads and
answers through it end to end (tiny random model, real files; the real model's figures:
benchmarks/README.md, "int8 stores")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from persistence_helpers import synth
from persistence_helpers.checks import flip_bits

from conftest import BOOK, QUESTION
from fot_memory_plugin import MemoryConfig
from fot_memory_plugin.core.errors import IncompatibleStoreError
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.persistence import CorruptDocumentError, IndexParams, MemoryStore
from fot_memory_plugin.persistence.cluster_index import ClusterSearch
from fot_memory_plugin.persistence.kvfile import kv_file_size, quantize_int8, rows_float32, stored_float, to_storage

EVERY_CLUSTER = ClusterSearch(probe=1.0, shared=1.0)


def test_the_int8_round_trip_is_within_half_a_step_of_each_vector_s_own_scale():
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-6, 4, 2000).view(-1, 1)  # subnormal float16 scales up to large keys
    vectors = torch.randn(2000, 64, generator=generator) * magnitudes
    vectors[7] = 0.0  # a zero vector
    stored = quantize_int8(vectors)
    assert stored.shape == (2000, 66) and stored.dtype == torch.int8
    scale = stored[:, -2:].contiguous().view(torch.float16).float()[:, 0]
    wanted = vectors.abs().amax(1) / 127
    assert (scale >= wanted).all() and (scale[wanted > 1e-4] <= wanted[wanted > 1e-4] * (1 + 2**-10)).all()
    error = (stored_float(stored, "int8") - vectors).abs()
    assert (error <= scale[:, None] / 2).all()
    assert scale[7] == 0 and (stored_float(stored, "int8")[7] == 0).all()
    # numpy input, the CPU writer's path, stores the same bytes
    assert np.array_equal(to_storage(vectors.numpy(), "int8"), stored.numpy())


@pytest.mark.parametrize("kind", ["clusters", "hnsw"])
def test_an_int8_document_takes_half_the_bytes_and_its_index_searches_it_exactly(tmp_path, kind):
    queries = synth.queries(2, 6)
    with MemoryStore.open(tmp_path / "store", fingerprint=synth.fingerprint()) as store:
        records = {dtype: synth.write_document(store, dtype, 3, 2500, dtype=dtype, index_params=IndexParams(kind=kind))
                   for dtype in ("float16", "int8")}
        sizes = {dtype: record.files["layer0.kv"]["size"] for dtype, record in records.items()}
        assert sizes["int8"] == kv_file_size(2500, synth.KV_HEADS, synth.HEAD_DIM, "int8") == 2500 * 2 * 3 * 66
        assert sizes["int8"] / sizes["float16"] == pytest.approx(66 / 128)
        exact = {dtype: store.memory(0, [dtype], exact=True).search(queries, 32) for dtype in records}
        searched = store.memory(0, ["int8"], exact_below=0, ef=2500, cluster_search=EVERY_CLUSTER).search(queries, 32)
        assert torch.equal(searched.token_ids, exact["int8"].token_ids)
        # against float16: most of the same top-32, and each key within its quantization step
        overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 32 for a, b in
                           zip(exact["int8"].token_ids.reshape(-1, 32), exact["float16"].token_ids.reshape(-1, 32))])
        assert overlap > 0.9
        stored = store.memory(0, ["int8"], exact=True)._parts[0].kv
        keys, _ = synth.doc_arrays(3, 2500, 0)
        scale = torch.from_numpy(np.ascontiguousarray(stored[:, 0, :, -2:])).view(torch.float16).float()
        error = (rows_float32(stored[:, 0], "int8") - torch.from_numpy(keys).transpose(0, 1)).abs()
        assert (error <= scale / 2 + 1e-6).all()


def test_a_flipped_byte_in_an_int8_file_is_found_before_it_answers(tmp_path):
    with MemoryStore.open(tmp_path / "store", fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "a", 5, 1500, dtype="int8")
    record, _ = flip_bits(tmp_path / "store", "a", "layer1.kv")
    with MemoryStore.open(tmp_path / "store", readonly=True) as store:
        assert record.id in store.verify()
        with pytest.raises(CorruptDocumentError):
            store.memory(1, ["a"]).search(synth.queries(1, 2, 1), 8)


CONFIG = MemoryConfig(local_window=64, top_k=8, retrieval="exact")


def test_a_model_reads_into_an_int8_store_and_answers_from_it_reopened(tmp_path, tiny_model_dir):
    text = BOOK.read_text(encoding="utf-8")[:1500]
    answers = {}
    for dtype in ("float16", "int8"):
        with DocumentMemory.open(tmp_path / dtype, model=str(tiny_model_dir), config=CONFIG, mem_dtype=dtype) as memory:
            record, _ = memory.read_text(text, name="chapter")
            assert record.dtype == dtype
        with DocumentMemory.open(tmp_path / dtype, readonly=True) as memory:
            assert memory.engine.config.mem_dtype == dtype
            answers[dtype] = memory.ask(QUESTION, chat=False, max_new_tokens=6, answer_mode="memory")
    sizes = {dtype: sum(file.stat().st_size for file in (tmp_path / dtype / "docs").rglob("*.kv")) for dtype in answers}
    assert sizes["int8"] / sizes["float16"] == pytest.approx((record.head_dim + 2) / (2 * record.head_dim))
    assert answers["int8"].sources and all(text[s.start_char : s.end_char] == s.text for s in answers["int8"].sources)
    assert json.dumps(answers["int8"].sources[0].to_dict())  # a source a user can check
    with pytest.raises(IncompatibleStoreError):  # a store keeps the dtype it was made with
        DocumentMemory.open(tmp_path / "int8", model=str(tiny_model_dir), config=CONFIG, mem_dtype="float16")


def test_the_cli_reads_into_an_int8_store_and_reindexes_it(tmp_path, tiny_model_dir):
    document = tmp_path / "chapter1.txt"
    document.write_text(BOOK.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    store = tmp_path / "store"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fot_memory_plugin.apps.cli", *args, "--store", str(store)],
                              capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=300)

    read = cli("read", str(document), "--model", str(tiny_model_dir), "--local-window", "64", "--mem-dtype", "int8")
    assert read.returncode == 0, read.stderr
    info = json.loads(cli("info", "--json").stdout)
    assert info["fingerprint"]["memory_config"]["mem_dtype"] == "int8"
    assert cli("reindex", "--index", "hnsw", "--json").returncode == 0  # the graphs are built from int8 keys
    assert cli("verify").returncode == 0
    asked = json.loads(cli("ask", QUESTION, "--no-chat", "--max-new-tokens", "4", "--json").stdout)
    assert asked["sources"]
