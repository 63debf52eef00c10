"""Can the default 135M model drive a ReActAgent? Count how often it calls the memory tool.

A store holds the opening of Pride and Prejudice (read once with the default model). For each
question a fresh llama-index `ReActAgent` whose LLM is the same model without memory
(`memory_docs=[]`, the ReAct prompt being longer than the local window) gets the FoT query
engine as its one tool. Per question it records whether the model wrote a ReAct step that
llama-index could parse into a call of the tool, whether the tool ran, the final answer, and
whether the answer contains the expected word. Two system prompts: llama-index's own ReAct
header, and a short one with a worked example; then the path that needs no tool call: the same
agent with a `FoTDocumentMemoryBlock` in its `Memory` (the passages the question draws memory
attention to go into the prompt); and, for reference, the tool alone (the FoT query engine).

    HF_HUB_OFFLINE=1 python benchmarks/react_agent.py --out benchmarks/results/react_agent.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "examples" / "data" / "pride_and_prejudice_ch1-4.txt"

# (question, a word the right answer contains): all answered in the book's first 3,000 characters.
QUESTIONS = [
    ("Who has taken Netherfield Park?", "Bingley"),
    ("Netherfield Park is let at last, to a young man named Mr.", "Bingley"),
    ("Where does Mr. Bingley come from?", "north"),
    ("How much does Mr. Bingley have a year?", "thousand"),
    ("What is the name of Mrs. Bennet's husband?", "Bennet"),
    ("When will Mr. Bingley take possession of Netherfield?", "Michaelmas"),
]

SHORT_HEADER = """You answer questions about a book. You have one tool:
{tool_desc}

To use it, write exactly:
Thought: I need to look this up.
Action: document_memory
Action Input: {{"input": "the question"}}

After the tool replies you see "Observation: ...". Then write exactly:
Thought: I can answer now.
Answer: the answer

Example:
Thought: I need to look this up.
Action: document_memory
Action Input: {{"input": "Who lives at Longbourn?"}}
Observation: The Bennet family.
Thought: I can answer now.
Answer: The Bennet family lives at Longbourn.
"""


async def ask(index, question: str, header: str | None, max_new_tokens: int, block: bool = False) -> dict:
    from llama_index.core.agent.workflow import ReActAgent
    from llama_index.core.memory import InsertMethod, Memory

    from fot_memory_plugin.integrations.llama_index.agent_memory import FoTDocumentMemoryBlock, document_memory_tool

    agent = ReActAgent(tools=[document_memory_tool(index, max_new_tokens=12, num_sources=1)],
                       llm=index.as_llm(memory_docs=[], max_new_tokens=max_new_tokens))
    if header is not None:
        agent.update_prompts({"react_header": header.replace("{tool_desc}", _tool_line(index))})
    steps: list[str] = []
    started = time.perf_counter()
    memory = None
    if block:  # ReActAgent drops the system message that Memory puts blocks into by default
        memory = Memory.from_defaults(token_limit=4000, insert_method=InsertMethod.USER, memory_blocks=[
            FoTDocumentMemoryBlock(index=index, num_sources=2, max_chars=300, accept_short_term_memory=False)])
    handler = agent.run(question, max_iterations=3, early_stopping_method="generate", memory=memory)
    async for event in handler.stream_events():
        if type(event).__name__ == "AgentOutput":
            steps.append(event.response.content or "")
    result = await handler
    calls = [{"tool": call.tool_name, "input": call.tool_kwargs, "output": str(call.tool_output.content)}
             for call in result.tool_calls]
    return {"question": question, "steps": steps, "tool_calls": calls,
            "called_memory_tool": any(call["tool"] == "document_memory" for call in calls),
            "answer": " ".join((result.response.content or "").split()), "seconds": time.perf_counter() - started}


async def chat_with_block(index, question: str, max_new_tokens: int) -> str:
    from llama_index.core.llms import ChatMessage
    from llama_index.core.memory import InsertMethod, Memory

    from fot_memory_plugin.integrations.llama_index.agent_memory import FoTDocumentMemoryBlock

    memory = Memory.from_defaults(token_limit=4000, insert_method=InsertMethod.USER, memory_blocks=[
        FoTDocumentMemoryBlock(index=index, num_sources=2, max_chars=300, accept_short_term_memory=False)])
    await memory.aput(ChatMessage(role="user", content=question))  # the turn, as an agent puts it
    reply = await index.as_llm(memory_docs=[], max_new_tokens=max_new_tokens).achat(await memory.aget())
    return " ".join((reply.message.content or "").split())


def _tool_line(index) -> str:
    from fot_memory_plugin.integrations.llama_index.agent_memory import document_memory_tool

    tool = document_memory_tool(index)
    return f"> document_memory: {tool.metadata.description}"


async def main_async(args: argparse.Namespace) -> dict:
    from llama_index.core import SimpleDirectoryReader

    from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex

    results: dict = {"model": "smollm2 (SmolLM2-135M-Instruct, zero-shot)", "prompts": {}}
    with tempfile.TemporaryDirectory() as scratch:
        opening = Path(scratch) / "pride_and_prejudice_opening.txt"
        opening.write_text(BOOK.read_text(encoding="utf-8")[:3000], encoding="utf-8")
        documents = SimpleDirectoryReader(input_files=[opening], filename_as_id=True).load_data()
        with FoTMemoryIndex.from_documents(documents, Path(scratch) / "store") as index:
            variants = (("llama-index ReAct header", None, False), ("short header with an example", SHORT_HEADER, False),
                        ("llama-index ReAct header + FoTDocumentMemoryBlock", None, True))
            for prompt_name, header, block in variants:
                rows = []
                for question, expected in QUESTIONS[: args.questions]:
                    row = await ask(index, question, header, args.max_new_tokens, block)
                    row["expected"], row["answer_right"] = expected, expected.lower() in row["answer"].lower()
                    print(json.dumps(row)[:400], flush=True)
                    rows.append(row)
                results["prompts"][prompt_name] = {
                    "questions": len(rows),
                    "called_memory_tool": sum(row["called_memory_tool"] for row in rows),
                    "answer_right": sum(row["answer_right"] for row in rows),
                    "rows": rows,
                }
            rows = []  # no agent: the block's passages in the user message, one chat call
            for question, expected in QUESTIONS[: args.questions]:
                answer = await chat_with_block(index, question, args.max_new_tokens)
                rows.append({"question": question, "answer": answer, "expected": expected,
                             "answer_right": expected.lower() in answer.lower()})
            results["no agent: Memory with FoTDocumentMemoryBlock, llm.chat"] = {
                "questions": len(rows), "answer_right": sum(row["answer_right"] for row in rows), "rows": rows}
            engine = index.as_query_engine(max_new_tokens=12, num_sources=1)
            rows = []
            for question, expected in QUESTIONS[: args.questions]:
                answer = " ".join(str(engine.query(question)).split())
                rows.append({"question": question, "answer": answer, "expected": expected,
                             "answer_right": expected.lower() in answer.lower()})
            results["tool alone (FoT query engine)"] = {
                "questions": len(rows), "answer_right": sum(row["answer_right"] for row in rows), "rows": rows}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=len(QUESTIONS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    for name, summary in results["prompts"].items():
        print(f"{name}: memory tool called {summary['called_memory_tool']}/{summary['questions']}, "
              f"answer right {summary['answer_right']}/{summary['questions']}")
    for name in ("no agent: Memory with FoTDocumentMemoryBlock, llm.chat", "tool alone (FoT query engine)"):
        print(f"{name}: answer right {results[name]['answer_right']}/{results[name]['questions']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
