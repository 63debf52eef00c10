"""What a conversation in FoT memory costs as it grows: seconds and tokens read per append, and
seconds per question, with the default model (memory in all 30 layers) on this machine.

Each append is one flush of two turns (conversations.append_turns); the tokens the model reads
are counted at its embedding layer, so a reread of earlier turns would show.

    HF_HUB_OFFLINE=1 python benchmarks/conversation_appends.py --appends 20 --out benchmarks/results/conversation_appends.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fot_memory_plugin.documents.conversations import append_turns, conversation_parts
from fot_memory_plugin.documents.document_memory import DocumentMemory

TURNS = [
    ("user", "Today I repainted the {n}th fence panel green and fixed hinge number {n}."),
    ("assistant", "Noted: panel {n} is green now and hinge {n} is fixed."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=20)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch, DocumentMemory.open(Path(scratch) / "store", model=args.model) as memory:
        read = [0]
        hook = memory.engine.model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: read.__setitem__(0, read[0] + inputs[0].numel()))
        for n in range(1, args.appends + 1):
            before, started = read[0], time.perf_counter()
            result = append_turns(memory, "bench", [(role, text.format(n=n)) for role, text in TURNS])
            seconds = time.perf_counter() - started
            rows.append({"append": n, "tokens_read": read[0] - before, "new_tokens": result.tokens_read,
                         "memory_tokens": result.memory_tokens, "seconds": round(seconds, 3)})
            print(json.dumps(rows[-1]), flush=True)
        hook.remove()
        parts = [record.id for record in conversation_parts(memory.store, "bench")]
        started = time.perf_counter()
        sources = memory.find_sources("What colour is fence panel 7 now?", docs=parts, num_sources=2)
        question_seconds = time.perf_counter() - started
    result = {"model": args.model, "layers": len(memory.engine.layers), "appends": rows,
              "question_over_all_parts_seconds": round(question_seconds, 3),
              "top_source": sources[0].text if sources else None}
    print(json.dumps({key: value for key, value in result.items() if key != "appends"}))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
