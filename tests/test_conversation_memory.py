"""An agent that remembers its conversations: turns flushed by a real llama-index `Memory` enter
FoT memory through `FoTDocumentMemoryBlock._aput`, one conversation part per flush, each append
reading only the new turns; after everything is closed and reopened from disk, a new
conversation's block passages hold what was said.

Tiny random model with SmolLM2's real tokenizer (llama_index_helpers); the end-to-end check
with the real SmolLM2 (the answer carries the fact, in a new process) is marked slow.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from llama_index.core.llms import ChatMessage
from llama_index.core.memory import InsertMethod, Memory

from fot_memory_plugin.integrations.llama_index.agent_memory import FoTDocumentMemoryBlock
from fot_memory_plugin.documents.conversations import append_turns, conversation_parts, conversations
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.core.errors import ConversationNameTakenError, StoreReadOnlyError
from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex
from fot_memory_plugin.persistence import writer as store_writer
from fot_memory_plugin.persistence.files import kv_filename
from fot_memory_plugin.persistence.kvfile import open_kv, rows_float32
from llama_index_helpers import *  # noqa: F403 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
FACT = "I left my bicycle at the north gate of the station, locked with the code 7316."
CHAT = [
    ChatMessage(role="user", content=FACT),
    ChatMessage(role="assistant", content="Noted: your bicycle is at the north gate, code 7316."),
    ChatMessage(role="user", content="Also, my sister Ines arrives on the 14:05 train from Porto."),
    ChatMessage(role="assistant", content="I will remember that Ines arrives at 14:05 from Porto."),
    ChatMessage(role="user", content="Thanks. What should I cook tonight?"),
    ChatMessage(role="assistant", content="A simple risotto with mushrooms would be quick and warm."),
]


def _memory(block: FoTDocumentMemoryBlock, session: str) -> Memory:
    # A small short-term budget, so that putting the chat makes Memory flush its oldest turns.
    return Memory.from_defaults(session_id=session, token_limit=120, chat_history_token_ratio=0.5,
                                token_flush_size=40, memory_blocks=[block], insert_method=InsertMethod.USER)


class _TokensRead:
    """Counts the tokens the model's embedding reads (every forward pass starts there)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self._hook = model.get_input_embeddings().register_forward_hook(self._add)

    def _add(self, module, inputs, output) -> None:
        self.count += inputs[0].numel()

    def close(self) -> None:
        self._hook.remove()


def test_flushed_turns_enter_memory_and_a_new_session_recalls_them_after_a_restart(fresh_store):
    with FoTMemoryIndex.from_persist_dir(fresh_store) as index:
        block = FoTDocumentMemoryBlock(index=index, num_sources=2)
        memory = _memory(block, "trip")
        asyncio.run(memory.aput_messages(CHAT))
        flushed = asyncio.run(memory.aget_all(status=None))
        archived = [m for m in flushed if m.content in {c.content for c in CHAT}]
        assert len(archived) == len(CHAT)
        assert block.appended, "Memory flushed turns to the block"
        parts = conversation_parts(index.memory.store, "trip")
        assert [r.id for r in parts] == [result.record.id for result in block.appended]
        first = parts[0].metadata["conversation"]
        assert first["chat_id"] == "trip" and first["part"] == 1 and first["first_turn"] == 0
        assert [turn["role"] for turn in first["turns"]][:2] == ["user", "assistant"]
        stored_text = "".join(c.text for c in index.memory.store.chunks(parts[0].id))
        assert stored_text.startswith(f"user: {FACT}\nassistant: Noted")

    # Everything closed; a new block and index over the directory, as a new process would have.
    block = FoTDocumentMemoryBlock(persist_dir=fresh_store, num_sources=50, max_chars=400)
    try:
        later = _memory(block, "next-week")
        question = "Where did I leave my bicycle?"
        content = asyncio.run(block.aget([ChatMessage(role="user", content=question)]))
        assert "Conversations in memory: trip (" in content
        assert f"[conversation trip, turn 1, user] user: {FACT}" in content
        prompt = asyncio.run(later.aget(input=question))  # the chat history llama-index sends the LLM
        assert FACT in "\n".join(message.content or "" for message in prompt)
        assert not block.appended  # asking reads nothing into memory
    finally:
        block.index.close()


def test_appending_turns_never_rereads_earlier_ones(fresh_store):
    with DocumentMemory.open(fresh_store) as memory:
        counter = _TokensRead(memory.engine.model)
        try:
            reads = []
            for start in range(0, len(CHAT), 2):
                turns = [(m.role.value, m.content) for m in CHAT[start:start + 2]]
                before = counter.count
                result = append_turns(memory, "trip", turns)
                transcript = "".join(f"{role}: {text}\n" for role, text in turns)
                new_tokens = len(memory.engine.tokenizer(transcript, add_special_tokens=False).input_ids)
                reads.append((counter.count - before, new_tokens, result))
        finally:
            counter.close()
        parts = conversation_parts(memory.store, "trip")
    for read, new_tokens, result in reads:  # the model read exactly the new turns' tokens, once
        assert read == new_tokens == result.tokens_read == result.record.num_tokens
    assert [result.memory_tokens for *_, result in reads] == [0, reads[0][1], reads[0][1] + reads[1][1]]
    assert [part.metadata["conversation"]["part"] for part in parts] == [1, 2, 3]
    assert [part.metadata["conversation"]["first_turn"] for part in parts] == [0, 2, 4]
    print("tokens read per append:", [read for read, *_ in reads])


def test_an_append_computes_what_a_continuous_read_would(fresh_store):
    """Part 2's keys equal those of one engine reading part 1's turns, then part 2's, memory kept;
    and part 1's files are not touched by the append."""
    turns_1 = [(m.role.value, m.content) for m in CHAT[:2]]
    turns_2 = [(m.role.value, m.content) for m in CHAT[2:]]
    with DocumentMemory.open(fresh_store) as memory:
        first = append_turns(memory, "trip", turns_1).record
        files_before = _digests(fresh_store / "docs" / first.id)
        second = append_turns(memory, "trip", turns_2).record
        assert _digests(fresh_store / "docs" / first.id) == files_before
        engine = memory.engine
        engine.reset()
        engine.read("".join(f"{r}: {t}\n" for r, t in turns_1))
        captured = {}  # window start -> {layer: (keys, values) (Hkv, T, D)}
        engine.read("".join(f"{r}: {t}\n" for r, t in turns_2), on_window=lambda start, end, kv: captured.setdefault(
            start, {layer: (keys[0].clone(), values[0].clone()) for layer, (keys, values) in kv.items()}))
        engine.reset()
        for layer in engine.layers:
            stored = rows_float32(open_kv(fresh_store / "docs" / second.id / kv_filename(layer), second.num_tokens,
                                          second.kv_heads, second.head_dim, second.dtype)[:], second.dtype)
            for side in (0, 1):  # keys, values
                expected = torch.cat([captured[start][layer][side] for start in sorted(captured)], dim=1)
                torch.testing.assert_close(stored[:, side].transpose(0, 1), expected.float(), rtol=0, atol=2e-3)


def _digests(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def test_an_append_that_fails_leaves_the_conversation_as_it_was(fresh_store, monkeypatch):
    with DocumentMemory.open(fresh_store) as memory:
        append_turns(memory, "trip", [("user", FACT)])
        before = [record.id for record in memory.store.documents()]

        def crash(step: str) -> None:
            if step == "files_written":
                raise RuntimeError("power cut")

        monkeypatch.setattr(store_writer, "after_step", crash)
        with pytest.raises(RuntimeError, match="power cut"):
            append_turns(memory, "trip", [("user", "This turn is lost.")])
        monkeypatch.setattr(store_writer, "after_step", lambda step: None)
        assert [record.id for record in memory.store.documents()] == before
        assert not any((fresh_store / "tmp").iterdir())
        again = append_turns(memory, "trip", [("user", "This one is kept.")])
    assert again.part == 2 and again.memory_tokens == conversation_parts_tokens(fresh_store, again)


def conversation_parts_tokens(store: Path, result) -> int:
    with DocumentMemory.open(store, readonly=True) as memory:
        parts = conversation_parts(memory.store, "trip")
    assert parts[-1].id == result.record.id
    return sum(part.num_tokens for part in parts[:-1])


KILLED_APPEND = r"""
import os, signal, sys
from fot_memory_plugin.documents.conversations import append_turns
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.persistence import writer

store, step = sys.argv[1], sys.argv[2]
with DocumentMemory.open(store) as memory:
    writer.after_step = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == step else None
    append_turns(memory, "trip", [("user", "This turn was being written when the power failed.")])
"""


@pytest.mark.parametrize("step", ["kv_written", "renamed", "committed"])
def test_an_append_killed_at_any_commit_step_leaves_whole_parts(fresh_store, step):
    with DocumentMemory.open(fresh_store) as memory:
        first = append_turns(memory, "trip", [("user", FACT)]).record
    killed = subprocess.run([sys.executable, "-c", KILLED_APPEND, str(fresh_store), step], capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "tests")}, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    with DocumentMemory.open(fresh_store) as memory:  # a writer-side open clears the dead writer's debris
        parts = conversation_parts(memory.store, "trip")
        assert parts[0].id == first.id and len(parts) == (2 if step == "committed" else 1)
        again = append_turns(memory, "trip", [("user", "And this one after the restart.")])
        ids = sorted(record.id for record in memory.store.documents())
        assert not list((fresh_store / "tmp").iterdir()), "the dead writer's files were left behind"
        assert sorted(path.name for path in (fresh_store / "docs").iterdir()) == ids
        assert memory.store.verify() == {}
    assert again.part == len(parts) + 1 and again.memory_tokens == sum(part.num_tokens for part in parts)


APPENDER = r"""
import json, pathlib, sys, time
from fot_memory_plugin.documents.conversations import append_turns
from fot_memory_plugin.documents.document_memory import DocumentMemory

store, who, gate = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
with DocumentMemory.open(store) as memory:
    (gate / f"ready-{who}").touch()  # the model is loaded: start together
    while not (gate / "go").exists():
        time.sleep(0.01)
    for n in range(4):
        result = append_turns(memory, "shared", [("user", f"{who} says hello for the {n}th time.")])
        print(json.dumps({"part": result.part, "memory_tokens": result.memory_tokens}), flush=True)
        time.sleep(0.2)  # the other writer's turn
"""


def test_two_processes_appending_to_one_conversation_take_turns(fresh_store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    workers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(fresh_store), who, str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for who in ("Ana", "Ben")]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{who}").exists() for who in ("Ana", "Ben")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results, owners = [], {}
    for who, worker in zip(("Ana", "Ben"), workers):
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        owners.update({result["part"]: who for result in results[-4:]})
    print("parts by writer:", [owners[part] for part in sorted(owners)])
    with DocumentMemory.open(fresh_store, readonly=True) as memory:
        parts = conversation_parts(memory.store, "shared")
    assert [part.metadata["conversation"]["part"] for part in parts] == list(range(1, 9))
    before = {part.metadata["conversation"]["part"]: sum(p.num_tokens for p in parts[:i]) for i, part in enumerate(parts)}
    for result in results:  # every append attended to every part published before it, none lost
        assert result["memory_tokens"] == before[result["part"]]
    assert sorted(result["part"] for result in results) == list(range(1, 9))


def test_a_document_holding_a_parts_name_is_reported(fresh_store):
    with DocumentMemory.open(fresh_store) as memory:
        memory.read_text("Not a conversation at all.", name="chat trip part 1")
        with pytest.raises(ConversationNameTakenError, match="not part 1 of conversation 'trip'"):
            append_turns(memory, "trip", [("user", FACT)])
        odd = append_turns(memory, "a/b\tc", [("user", "Names are made safe.")])
    assert odd.record.name.startswith("chat a_b_c~") and odd.record.name.endswith(" part 1")


def test_turns_go_to_their_own_conversations_and_can_be_refused(fresh_store, store_dir):
    with FoTMemoryIndex.from_persist_dir(fresh_store) as index:
        block = FoTDocumentMemoryBlock(index=index, chat_id="desk")
        asyncio.run(block.aput([ChatMessage(role="user", content="Room 12 has the projector."),
                                ChatMessage(role="user", content="Ask Ana.", additional_kwargs={"session_id": "s2"})]))
        found = conversations(index.memory.store)
        assert set(found) == {"desk", "s2"} and asyncio.run(block.aget([])).endswith(
            "Conversations in memory: desk (1 turn), s2 (1 turn).")
        quiet = FoTDocumentMemoryBlock(index=index, accept_short_term_memory=False)
        asyncio.run(quiet.aput([ChatMessage(role="user", content="dropped")], from_short_term_memory=True))
        assert not quiet.appended and set(conversations(index.memory.store)) == {"desk", "s2"}
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        with pytest.raises(StoreReadOnlyError):
            asyncio.run(FoTDocumentMemoryBlock(index=index).aput([ChatMessage(role="user", content="hi")]))


# --- the real model, a real restart ---------------------------------------------------------------

SESSION_TWO = r"""
import asyncio, json, sys
from llama_index.core.llms import ChatMessage
from llama_index.core.memory import InsertMethod, Memory
from fot_memory_plugin.integrations.llama_index.agent_memory import FoTDocumentMemoryBlock
from fot_memory_plugin.documents.conversations import conversation_parts

store, question, cue = sys.argv[1], sys.argv[2], sys.argv[3]
block = FoTDocumentMemoryBlock(persist_dir=store, num_sources=2, max_chars=300)
memory = Memory.from_defaults(session_id="a-new-conversation", token_limit=2000, memory_blocks=[block],
                              insert_method=InsertMethod.USER)
asyncio.run(memory.aput(ChatMessage(role="user", content=question)))
messages = asyncio.run(memory.aget())  # the question, the block's passages inserted before it
chat = block.index.as_llm(memory_docs=[], max_new_tokens=24).chat(messages)  # the plain model, passages in its prompt
said = [part.name for part in conversation_parts(block.index.memory.store, "monday")]
answer = block.index.as_llm(memory_docs=said, max_new_tokens=8).complete(cue)  # memory attention over the chat
print(json.dumps({"prompt": messages[-1].content, "chat": chat.message.content, "answer": answer.text,
                  "sources": answer.additional_kwargs["sources"]}))
block.index.close()
"""


@pytest.mark.slow
def test_a_fact_told_in_one_session_is_recalled_by_the_real_model_in_a_new_process(tmp_path, smollm2):
    store = tmp_path / "store"
    index = FoTMemoryIndex.from_documents([], store, model="smollm2")
    try:
        block = FoTDocumentMemoryBlock(index=index)
        asyncio.run(_memory(block, "monday").aput_messages(CHAT))
        assert block.appended and FACT in "".join(
            c.text for c in index.memory.store.chunks(block.appended[0].record.id))
    finally:
        index.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    question, cue = "What is the code of the lock on my bicycle?", "My bicycle lock code is"
    done = subprocess.run([sys.executable, "-c", SESSION_TWO, str(store), question, cue], capture_output=True,
                          text=True, env=env, timeout=600, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    assert FACT in result["prompt"] and question in result["prompt"]  # the block's passages hold what was said
    # The answer, through memory attention over Monday's conversation, carries it, citing the turn.
    # the first source is the placed passage around the cited turn: the turn that holds the fact
    assert "7316" in result["answer"] and f"user: {FACT}\n" in result["sources"][0]["text"]
    assert "7316" in result["chat"]  # and so does the plain chat with the passages before the question
