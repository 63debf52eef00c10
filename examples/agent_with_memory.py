"""A llama-index agent whose document memories survive a restart.

The agent is a `ReActAgent` (a CustomLLM is not function-calling) with two ways into FoT memory:
a `FoTDocumentMemoryBlock` in its `Memory`, which puts the passages that the user's message
draws memory attention to into the prompt on every turn, and the FoT query engine as a
`QueryEngineTool`. The documents live in a store directory and the chat history in a SQLite
file in the same directory, so a second process (the "restart") finds both. Without a command the example
runs two sessions, each as its own process.

The agent's own LLM is the same small model without memory (`memory_docs=[]`): the ReAct prompt
is ~1,000 tokens, more than the local window that answering from memory allows. The 135M model
rarely follows the ReAct format; the agent then stops early and answers directly (both are
shown, never hidden).

    python examples/agent_with_memory.py                        # two sessions on the bundled novel's opening
    python examples/agent_with_memory.py session "Who took Netherfield Park?" --store DIR
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "examples" / "data" / "pride_and_prejudice_ch1-4.txt"
QUESTIONS = ["Netherfield Park is let at last, to a young man named Mr.", "Who has taken Netherfield Park?"]
SESSION = "reader"  # the chat-history key in the SQLite chat store


async def session(question: str, store: Path, document: Path, max_new_tokens: int) -> str:
    from llama_index.core import SimpleDirectoryReader
    from llama_index.core.agent.workflow import ReActAgent
    from llama_index.core.memory import InsertMethod, Memory

    from llama_index.llms.fot_memory import FoTMemoryIndex
    from llama_index.memory.fot_memory import FoTDocumentMemoryBlock, document_memory_tool

    first = not (store / "memory.sqlite").exists()
    index = FoTMemoryIndex.from_documents(
        SimpleDirectoryReader(input_files=[document], filename_as_id=True).load_data() if first else [], store
    )
    with index:
        names = ", ".join(record.name for record in index.memory.documents())
        print(f"[pid {os.getpid()}] {'read into a new store' if first else 'reopened the store'}: {names}")
        block = FoTDocumentMemoryBlock(index=index, num_sources=2, max_chars=300)
        memory = Memory.from_defaults(
            session_id=SESSION, token_limit=1500, memory_blocks=[block],
            # ReActAgent drops the system message that Memory would put blocks into: use the user message.
            insert_method=InsertMethod.USER,
            async_database_uri=f"sqlite+aiosqlite:///{store / 'chat.sqlite'}",
        )
        earlier = await memory.aget_all()
        print(f"chat history from earlier sessions: {len(earlier)} messages")
        agent = ReActAgent(
            tools=[document_memory_tool(index, max_new_tokens=8, num_sources=1)],
            llm=index.as_llm(memory_docs=[], max_new_tokens=max_new_tokens),
        )
        print(f"memory block for {question!r}:\n{await block.aget([_user(question)])}")
        result = await agent.run(question, memory=memory, max_iterations=3, early_stopping_method="generate")
        for call in result.tool_calls:
            print(f"tool {call.tool_name}({call.tool_kwargs}) -> {call.tool_output.content!r}")
        answer = " ".join((result.response.content or "").split())
        print(f"Q: {question}\nagent: {answer}\n")
        return answer


def _user(text: str):
    from llama_index.core.llms import ChatMessage

    return ChatMessage(role="user", content=text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / ".cache" / "agent-example-store")
    parser.add_argument("--document", type=Path, default=DOCUMENT, help="read into a new store")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    commands = parser.add_subparsers(dest="command")
    one = commands.add_parser("session", help="one agent session (one process)")
    one.add_argument("question")
    args = parser.parse_args(argv)

    if args.command == "session":
        asyncio.run(session(args.question, args.store, args.document, args.max_new_tokens))
    else:  # the demo: a session, a restart, another session
        common = [sys.executable, __file__, "--store", str(args.store), "--document", str(args.document),
                  "--max-new-tokens", str(args.max_new_tokens)]
        for question in QUESTIONS:
            subprocess.run([*common, "session", question], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
