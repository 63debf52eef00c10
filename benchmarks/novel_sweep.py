"""Whole-novel QA: read a novel into in-RAM exact memory once per config, ask completions.

    HF_HUB_OFFLINE=1 python benchmarks/novel_sweep.py ../shared/data/books/northangerabbey.txt              # zero-shot, 30 layers
    HF_HUB_OFFLINE=1 python benchmarks/novel_sweep.py ../shared/data/books/northangerabbey.txt --model smollm2-fot

GPU: ~50 s per config. Writes $OUT/novel_sweep-<model>.json (OUT defaults to benchmarks/out).
Six completion-form questions whose answers lie far outside the local window (the book was held
out of FoT training); the no-memory control shows what the model knows without the book.
"""
import argparse
import dataclasses
import json
import os
import time

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

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("book")
parser.add_argument("--model", default="smollm2", help="'smollm2' (zero-shot) or 'smollm2-fot' (its own memory layers)")
parser.add_argument("--top-k", type=int, nargs="+", default=[32, 128])
parser.add_argument("--questions", help="a JSON list of [question, expected answer] (default: the Northanger Abbey six)")
args = parser.parse_args()
if args.questions:
    QUESTIONS = [tuple(item) for item in json.load(open(args.questions, encoding="utf-8"))]

book = open(args.book, encoding="utf-8").read()
loaded = load_model(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
base = loaded.memory_config_for(MemoryConfig())
configs = [dataclasses.replace(base, top_k=k) for k in args.top_k]
if loaded.memory_config is None:  # zero-shot: also InfLLM's fixed mode
    configs.append(dataclasses.replace(base, top_k=8, positional_mode="fixed"))
results = {}
for config in configs:
    with MemoryEngine(loaded.model, loaded.tokenizer, config) as engine:
        started = time.time()
        engine.read(book)
        read_s = time.time() - started
        answers = []
        for question, expected in QUESTIONS:
            answer = engine.answer(question, chat=False, max_new_tokens=8)
            answers.append((expected in answer.lower(), answer))
        name = f"{config.positional_mode}-k{config.top_k}"
        results[name] = answers
        print(name, f"read {read_s:.0f}s", sum(ok for ok, _ in answers), "/", len(answers), answers, flush=True)
with MemoryEngine(loaded.model, loaded.tokenizer) as engine:
    control = [(e in (a := engine.answer(q, chat=False, max_new_tokens=8)).lower(), a) for q, e in QUESTIONS]
print("no memory", sum(ok for ok, _ in control), control)
book_name = os.path.splitext(os.path.basename(args.book))[0]
out = os.path.join(os.environ.get("OUT", "benchmarks/out"), f"novel_sweep-{book_name}-{args.model}.json")
json.dump({"model": args.model, "results": results, "control": control}, open(out, "w"), indent=1)
