"""Whole-novel QA, zero-shot: read a novel into in-RAM exact memory once per config, ask completions.

    HF_HUB_OFFLINE=1 python benchmarks/novel_sweep.py ../shared/data/books/northangerabbey.txt   # GPU: ~50 s per config

Writes $OUT/novel_sweep.json (OUT defaults to benchmarks/out). Six completion-form questions
whose answers lie far outside the local window; the no-memory control shows what the model
knows without the book.
"""
import sys, time, json, os
import torch
from fot_memory_plugin import MemoryConfig, MemoryEngine, load_model

QUESTIONS = [
    ("Catherine Morland's father was a clergyman, a very respectable man, though his name was", "richard"),
    ("The master of the ceremonies introduced to her a very gentlemanlike young man as a partner; his name was", "tilney"),
    ("Mr. Allen owned the chief of the property about", "fullerton"),
    ("Isabella's brother, who drove Catherine out in his gig, was John", "thorpe"),
    ("Isabella Thorpe became engaged to Catherine's brother,", "james"),
    ("The Tilneys invited Catherine to stay with them at their home, which was called", "northanger"),
]
book = open(sys.argv[1], encoding="utf-8").read()
loaded = load_model("smollm2", device="cuda" if torch.cuda.is_available() else "cpu")
results = {}
for mode, k, layers in [("zero", 32, None), ("zero", 8, None), ("fixed", 8, None), ("zero", 128, None)]:
    config = MemoryConfig(top_k=k, positional_mode=mode, mem_layers=layers)
    with MemoryEngine(loaded.model, loaded.tokenizer, config) as engine:
        started = time.time()
        engine.read(book)
        read_s = time.time() - started
        answers = []
        for question, expected in QUESTIONS:
            answer = engine.answer(question, chat=False, max_new_tokens=8)
            answers.append((expected in answer.lower(), answer))
        name = f"{mode}-k{k}"
        results[name] = answers
        print(name, f"read {read_s:.0f}s", sum(ok for ok, _ in answers), "/", len(answers), answers, flush=True)
with MemoryEngine(loaded.model, loaded.tokenizer) as engine:
    control = [(e in (a := engine.answer(q, chat=False, max_new_tokens=8)).lower(), a) for q, e in QUESTIONS]
print("no memory", sum(ok for ok, _ in control), control)
json.dump({"results": results, "control": control}, open(os.path.join(os.environ.get("OUT", "benchmarks/out"), "novel_sweep.json"), "w"), indent=1)
