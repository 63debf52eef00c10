"""Source ranking (attention share, lift over a question-independent probe) and re-read answering:
pure functions on hand-made chunks, a tiny random model over real text, and the real smollm2-fot
finding a planted fact in a held-out novel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BOOK, QUESTION
from fot_memory_plugin import MemoryConfig
from fot_memory_plugin.core.config import ANSWER_MODES, CHAT_ANSWER_INSTRUCTIONS
from fot_memory_plugin.apps.cli import main
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex
from fot_memory_plugin.integrations.llama_index.llm import FoTMemoryLLM
from fot_memory_plugin.documents.passages import (
    BASELINE_PROBE, ScoredChunk, choose_passages, chunk_shares, passage_text, placed_runs, rank_chunks,
)
from fot_memory_plugin.persistence import Chunk

CONFIG = MemoryConfig(local_window=64, top_k=8, mem_dtype="float16", retrieval="exact")


def _chunks(doc_id: str, spans: list[tuple[int, int]], text: str) -> list[Chunk]:
    """Chunks of 10 tokens whose characters are the given spans of `text`."""
    return [Chunk(doc_id, i, 10 * i, 10 * (i + 1), a, b, text[a:b]) for i, (a, b) in enumerate(spans)]


def test_chunk_shares_leave_out_window_starts_and_sum_to_one():
    chunks = _chunks("d", [(0, 1), (1, 2), (2, 3)], "abc")
    starts = np.array([0, 10, 20])
    attention = torch.ones(30, dtype=torch.float64)
    attention[0] = 1000.0  # a sink at the first token of the first window
    shares = chunk_shares(attention, ["d"], [0, 30], 16, lambda doc: (chunks, starts))
    # window starts 0 and 16 are dropped: chunk 0 keeps 9 tokens, chunk 1 keeps 9 (16 dropped), chunk 2 all 10
    assert np.allclose(shares["d"], np.array([9, 9, 10]) / 28)


def test_lift_ranks_what_the_question_adds_over_the_probe():
    chunks = _chunks("d", [(0, 1), (1, 2), (2, 3)], "abc")
    of = lambda doc: (chunks, np.array([0, 10, 20]))  # noqa: E731
    question = {"d": np.array([0.6, 0.3, 0.1])}
    probe = {"d": np.array([0.7, 0.05, 0.25])}  # chunk 0 draws attention whatever is asked
    assert [s.chunk.index for s in rank_chunks(question, None, of, "attention")] == [0, 1, 2]
    ranked = rank_chunks(question, probe, of, "lift")
    assert [s.chunk.index for s in ranked] == [1, 0, 2]
    assert ranked[0].share == pytest.approx(0.3) and ranked[0].lift == pytest.approx(0.25)


def test_passages_fit_the_budget_best_first_and_are_placed_in_document_order():
    text = "Alpha one. Beta two. Gamma three. Delta four."
    chunks = _chunks("d", [(0, 10), (11, 20), (21, 33), (34, 45)], text)
    ranked = [ScoredChunk("d", chunks[i], share, share) for i, share in ((2, 0.5), (0, 0.3), (3, 0.1), (1, 0.05))]
    chosen = choose_passages(ranked, budget_tokens=25, around=0)  # two 10-token chunks fit
    assert [passage.hit.chunk.index for passage in chosen] == [2, 0]
    assert passage_text(chosen, ["d"]) == "Alpha one.\n\nGamma three."
    everything = choose_passages(ranked, budget_tokens=40, around=0)
    assert passage_text(everything, ["d"]) == text  # adjacent chunks merge back into the text


def test_each_hit_is_placed_with_its_neighbours_once_and_alone_when_they_do_not_fit():
    text = "Alpha one. Beta two. Gamma three. Delta four. Epsilon five."
    chunks = _chunks("d", [(0, 10), (11, 20), (21, 33), (34, 45), (46, 59)], text)
    of = lambda doc: (chunks, np.array([c.start_token for c in chunks]))  # noqa: E731
    ranked = [ScoredChunk("d", chunks[i], share, share) for i, share in ((1, 0.5), (2, 0.3), (4, 0.1))]
    chosen = choose_passages(ranked, budget_tokens=50, chunks_of=of)
    # hit 1 brings chunks 0-2; hit 2 is already placed; hit 4 and its free neighbour 3 fill the rest
    assert [(p.hit.chunk.index, [c.index for c in p.chunks]) for p in chosen] == [(1, [0, 1, 2]), (2, []), (4, [3, 4])]
    assert passage_text(chosen, ["d"]) == text
    assert [p.hit.chunk.index for p in choose_passages(ranked, 40, of)] == [1, 2, 4]  # 4 alone: 10 tokens left
    tight = choose_passages(ranked, budget_tokens=25, chunks_of=of)  # 30 tokens around hit 1 do not fit
    assert [(p.hit.chunk.index, [c.index for c in p.chunks]) for p in tight] == [(1, [1]), (2, [2])]
    with pytest.raises(ValueError, match="chunks_of"):
        choose_passages(ranked, budget_tokens=40)



def test_passages_placed_side_by_side_read_and_cite_as_one_run_scored_by_the_better_hit():
    text = "Alpha one. Beta two. Gamma three. Delta four. Epsilon five. Zeta six. Eta seven."
    spans = [(0, 10), (11, 20), (21, 33), (34, 45), (46, 59), (60, 69), (70, 81)]
    chunks = _chunks("d", spans, text)
    of = lambda doc: (chunks, np.array([c.start_token for c in chunks]))  # noqa: E731
    # hit 4 places chunks 3-5, hit 1 places 0-2: they touch, so they read and cite as one passage
    ranked = [ScoredChunk("d", chunks[i], share, share) for i, share in ((4, 0.5), (1, 0.3))]
    runs = placed_runs(choose_passages(ranked, budget_tokens=60, chunks_of=of))
    assert [(hit.chunk.index, [c.index for c in run]) for hit, run in runs] == [(4, [0, 1, 2, 3, 4, 5])]
    apart = [ScoredChunk("d", chunks[i], share, share) for i, share in ((5, 0.5), (1, 0.3))]
    runs = placed_runs(choose_passages(apart, budget_tokens=60, chunks_of=of))  # chunk 3 is the gap
    assert [(hit.chunk.index, [c.index for c in run]) for hit, run in runs] == [(5, [4, 5, 6]), (1, [0, 1, 2])]
    assert passage_text(choose_passages(apart, 60, of), ["d"]) == text[:33] + "\n\n" + text[46:]


def test_the_best_passage_is_placed_last_next_to_the_question_unless_document_order_is_asked():
    text = "Alpha one. Beta two. Gamma three. Delta four."
    chunks = _chunks("d", [(0, 10), (11, 20), (21, 33), (34, 45)], text)
    other = _chunks("e", [(0, 8)], "Omega x.")
    ranked = [ScoredChunk("d", chunks[0], 0.5, 0.5), ScoredChunk("e", other[0], 0.4, 0.4),
              ScoredChunk("d", chunks[3], 0.3, 0.3)]
    chosen = choose_passages(ranked, budget_tokens=40, around=0)
    assert passage_text(chosen) == "Delta four.\n\nOmega x.\n\nAlpha one."  # worst first, best last
    assert passage_text(chosen, ["e", "d"]) == "Omega x.\n\nAlpha one.\n\nDelta four."


@pytest.fixture(scope="module")
def short_store(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("passages")
    (folder / "short.txt").write_text(BOOK.read_text(encoding="utf-8")[:600], encoding="utf-8")
    with DocumentMemory.open(folder / "store", model=str(tiny_model_dir), config=CONFIG) as memory:
        memory.read_file(folder / "short.txt")
    return folder / "store"


def test_reread_of_a_document_shorter_than_the_window_asks_with_the_document_in_context(short_store, tiny_model_dir):
    config = CONFIG.replace(last_context_length=512)  # room for the whole document beside the question
    with DocumentMemory.open(short_store, model=str(tiny_model_dir), config=config) as memory:
        records = memory.documents()
        prompt = memory.engine.encode(QUESTION)
        ranked = memory._passages(records, prompt, False, True, "lift")
        chosen, reread = memory._reread_prompt(QUESTION, ranked, False, 4)
        chunks = memory.store.chunks(records[0].id)
        assert {c.index for p in chosen for c in p.chunks} == {c.index for c in chunks}  # everything is placed
        document = BOOK.read_text(encoding="utf-8")[:600]
        placed = memory.engine.tokenizer.decode(reread[0])
        assert " ".join(placed.split()) == " ".join(f"{document}\n\n{QUESTION}".split())
        answer = memory.ask(QUESTION, chat=False, max_new_tokens=4, answer_mode="reread", exact=True)
        with memory._attending(records, exact=True):
            direct = memory.engine.generate(memory.engine.encode(f"{passage_text(chosen)}\n\n{QUESTION}"),
                                            max_new_tokens=4)
        assert answer.text == memory.engine.tokenizer.decode(direct[0], skip_special_tokens=True).strip()
        # one source per placed passage (a cited chunk and its neighbours), exactly the document's text there
        spans = [(p.chunks[0].start_char, p.chunks[-1].end_char) for p in chosen if p.chunks]
        assert [(s.start_char, s.end_char) for s in answer.sources] == spans[:3]
        assert all(s.text == document[s.start_char:s.end_char] for s in answer.sources)
        assert [s.lift for s in answer.sources] == [round(p.hit.lift, 6) for p in chosen if p.chunks][:3]
        plain = memory.ask(QUESTION, chat=False, max_new_tokens=4, answer_mode="passages", exact=True)
        text = memory.engine.generate(reread, max_new_tokens=4, plain=True)  # the same text, memory detached
        assert plain.text == memory.engine.tokenizer.decode(text[0], skip_special_tokens=True).strip()
        assert plain.sources == answer.sources


def test_a_chat_question_in_passages_mode_asks_for_a_short_answer_and_the_others_as_written(
        short_store, tiny_model_dir, monkeypatch):
    short = CHAT_ANSWER_INSTRUCTIONS["passages"]
    with DocumentMemory.open(short_store, model=str(tiny_model_dir), config=CONFIG) as memory:
        prompted: list[str] = []  # every text put in the chat template
        chat_prompt = memory.engine.chat_prompt
        monkeypatch.setattr(memory.engine, "chat_prompt", lambda text: prompted.append(text) or chat_prompt(text))

        def questions(**options) -> set[str]:
            """The questions (each prompt's last paragraph) one ask put in the chat template."""
            prompted.clear()
            memory.ask(QUESTION, max_new_tokens=1, exact=True, **options)
            return {text.rsplit("\n\n", 1)[-1] for text in prompted} - {BASELINE_PROBE}

        assert questions(answer_mode="passages") == {QUESTION + short}
        assert questions(answer_mode="passages", instruction="") == {QUESTION}
        assert questions(answer_mode="memory") == {QUESTION}
        assert questions(answer_mode="reread", instruction=" Be brief.") == {QUESTION + " Be brief."}
        assert questions(answer_mode="passages", chat=False) == set()  # a completion is asked as written


def test_reread_places_only_what_fits_beside_question_and_answer(short_store, tiny_model_dir):
    config = CONFIG.replace(last_context_length=128)  # room for a passage or two, not the document
    with DocumentMemory.open(short_store, model=str(tiny_model_dir), config=config) as memory:
        records = memory.documents()
        prompt = memory.engine.encode(QUESTION)
        ranked = memory._passages(records, prompt, False, True, "lift")
        chosen, reread = memory._reread_prompt(QUESTION, ranked, False, 8)
        assert len({c.index for p in chosen for c in p.chunks}) < len(memory.store.chunks(records[0].id))
        assert reread.shape[1] + 8 <= memory.engine.config.context_length
        budget = memory.engine.config.context_length - prompt.shape[1] - 8
        assert chosen == choose_passages(ranked, budget, memory._chunks_of)[: len(chosen)] and chosen
        expected = f"{passage_text(chosen)}\n\n{QUESTION}"
        assert memory.engine.tokenizer.decode(reread[0]) == memory.engine.tokenizer.decode(
            memory.engine.encode(expected)[0])


def test_every_answer_mode_is_reachable_from_cli_llm_query_engine_and_block(short_store, tmp_path, capsys):
    store = Path(shutil.copytree(short_store, tmp_path / "store"))
    for mode in ANSWER_MODES:
        capsys.readouterr()
        code = main(["ask", QUESTION, "--store", str(store), "--no-chat", "--max-new-tokens", "2", "--json",
                     "--answer-mode", mode, "--ranking", "attention"])
        assert code == 0 and json.loads(capsys.readouterr().out)["sources"]
    with FoTMemoryIndex.from_persist_dir(store) as index:
        for mode in ANSWER_MODES:
            response = index.as_query_engine(answer_mode=mode, max_new_tokens=2).query(QUESTION)
            assert response.source_nodes
            llm = FoTMemoryLLM(document_memory=index.memory, answer_mode=mode, max_new_tokens=2)
            assert llm.complete(QUESTION).additional_kwargs["sources"]
            assert llm.complete(QUESTION, answer_mode="memory", ranking="attention").additional_kwargs["sources"]
        from fot_memory_plugin.integrations.llama_index.agent_memory import FoTDocumentMemoryBlock

        block = FoTDocumentMemoryBlock(index=index, ranking="attention")
        assert block._passages(QUESTION, None)
        with pytest.raises(ValueError, match="answer_mode must be one of"):
            index.memory.ask(QUESTION, answer_mode="guess")


@pytest.mark.slow
def test_a_planted_fact_outranks_the_opening_and_every_window_start(smollm2_fot, tmp_path):
    """smollm2-fot, ~2k tokens of held-out Persuasion with one invented fact in the middle."""
    book = (Path(__file__).resolve().parents[2] / "shared" / "data" / "books" / "persuasion.txt")
    if not book.exists():
        pytest.skip("needs ../shared/data/books")
    paragraphs = [p for p in book.read_text(encoding="utf-8").split("\n\n") if p.strip()][40:70]
    fact = "The lighthouse keeper's parrot was called Captain Biscuit."
    text = "\n\n".join(paragraphs[:15] + [fact] + paragraphs[15:])
    fact_at = text.index(fact)
    with DocumentMemory.open(tmp_path / "store", model="smollm2-fot") as memory:
        memory.read_text(text, name="persuasion-part", retrieve=False)
        sources = memory.find_sources("The lighthouse keeper's parrot was called Captain", chat=False,
                                      num_sources=40, exact=True)
        first = sources[0]
        assert first.start_char <= fact_at + len(fact) and first.end_char > fact_at, sources[:3]
        window = memory.engine.config.local_window
        chunks = memory.store.chunks("persuasion-part")
        window_starts = {c.start_char for c in chunks if c.start_token % window == 0}
        ranks = {source.start_char: rank for rank, source in enumerate(sources)}
        assert all(ranks.get(start, len(sources)) > 0 for start in window_starts | {0})
        answer = memory.ask("The lighthouse keeper's parrot was called Captain", chat=False, max_new_tokens=3,
                            answer_mode="reread", exact=True)
        assert "Biscuit" in answer.text


def test_sentence_chunks_tile_the_tokens_and_cut_between_sentences(smollm2):
    from fot_memory_plugin.documents.passages import sentence_chunks

    text = BOOK.read_text(encoding="utf-8")[:3000]
    encoding = smollm2.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = encoding["offset_mapping"]
    tokenize = lambda piece: smollm2.tokenizer.encode(piece, add_special_tokens=False)  # noqa: E731
    chunks = sentence_chunks(text, offsets, tokenize, max_tokens=64)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(offsets)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # every token in exactly one chunk
    assert all(end - start <= 80 for start, end, *_ in chunks)  # about the splitter's 64 (token counts differ a little in context)
    for start, end, start_char, end_char, piece in chunks:
        assert piece == text[start_char:end_char] and piece.strip()
    ends = [piece.rstrip()[-1] for *_, piece in chunks[:-1]]
    assert sum(end in '.!?"_;:' for end in ends) >= 0.8 * len(ends)  # whole sentences, not 64-token cuts


def test_voting_heads_rank_by_their_own_attention_only(short_store, tiny_model_dir):
    from fot_memory_plugin.documents.passages import chunk_sums
    from fot_memory_plugin.documents.voting_heads import VotingHeads

    with DocumentMemory.open(short_store, model=str(tiny_model_dir), config=CONFIG) as memory:
        assert memory.voting_heads is None  # no profile was calibrated for this model
        records = memory.documents()
        doc_id = records[0].id
        labels, question, probe = memory.head_attention(QUESTION, chat=False)
        prompt = memory.engine.encode(QUESTION)
        with memory._attending(records, exact=True) as (memories, attention), torch.no_grad():
            memory.engine.model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False)
        every = chunk_sums(attention, [doc_id], next(iter(memories.values())).offsets, CONFIG.local_window,
                           memory._chunks_of)[doc_id]
        assert np.allclose(question[doc_id].sum(axis=0), every)  # per-head attention adds up to the whole
        layer, head = labels[-1]
        memory.voting_heads = VotingHeads({layer: (head,)})
        ranked = memory._passages(records, prompt, False, True, "attention")
        alone = question[doc_id][-1]
        assert [item.chunk.index for item in ranked] == [int(i) for i in np.argsort(-alone, kind="stable") if alone[i] > 0]


def test_a_voting_heads_profile_of_another_model_is_not_used(tmp_path, monkeypatch):
    from fot_memory_plugin.documents import voting_heads

    profile = voting_heads.VotingHeads({3: (1, 2)}, "some/model", "abc", {"examples": 4})
    profile.save(tmp_path / "mine.json")
    assert voting_heads.VotingHeads.load(tmp_path / "mine.json") == profile
    monkeypatch.setattr(voting_heads, "HEADS_DIR", tmp_path)
    same = {"model": {"model_id": "some/model", "config_hash": "abc"}}
    assert voting_heads.VotingHeads.for_model("mine", same, [3, 4]) == profile
    assert voting_heads.VotingHeads.for_model("mine", {"model": {"model_id": "other", "config_hash": "abc"}}, [3]) is None
    assert voting_heads.VotingHeads.for_model("mine", same, [4]) is None  # layer 3 is not a memory layer here
    with pytest.raises(ValueError, match="at least one head"):
        voting_heads.VotingHeads({3: ()})
