"""Passkey retrieval through stores of each dtype: the same reading written to a float16 and an
int8 store (and any other --dtypes) side by side, then asked from each.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/passkey_store.py --lengths 16000 64000 --trials 1
    # = --dtypes float16 int8 --depths 0.1 0.5 0.9 --model smollm2-fot

The standard passkey prompt (fot_memory_plugin.apps.passkey) is split as `fot-memory eval
passkey` splits it: its last --tail tokens (filler, then the question) stay the prompt, the rest
is read once by the model, as `fot-memory read` reads a document (without retrieval for a
FoT-tuned model), each window's keys and values appended to one document per store. Each store
is then asked, completion form, 8 new tokens, through its cluster indexes and by the exact scan:
the tail in the memory answer mode (the memory layers attend to the stored keys: what a
quantized key can change), and the question alone ("What is the pass key? The pass key is") in
the default passages mode, as a user asks. A trial is right when the number that opens the
answer is the passkey.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
import time
from pathlib import Path

import torch

from fot_memory_plugin.apps.passkey import MAX_PASSKEY, QUESTION, is_correct, prompt_of_length
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.documents.passages import sentence_chunks
from fot_memory_plugin.persistence import MemoryStore

OUT = Path(__file__).resolve().parent / "out"
SEARCHES = [(mode, exact) for mode in ("memory", "passages") for exact in (False, True)]


def read_into(memories: dict[str, DocumentMemory], text: str) -> int:
    """Read `text` once, writing every window into one new document of each memory's store."""
    engine = next(iter(memories.values())).engine
    encoding = engine.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = torch.tensor([encoding["input_ids"]], dtype=torch.long)
    chunks = sentence_chunks(text, encoding["offset_mapping"],
                             lambda piece: engine.tokenizer.encode(piece, add_special_tokens=False))
    writers = [memory.store.begin_document("haystack", sha256=hashlib.sha256(text.encode()).hexdigest(), text_length=len(text), dtype=dtype)
               for dtype, memory in memories.items()]
    try:
        for writer in writers:
            writer.add_chunks(chunks)

        def to_stores(start: int, end: int, captured: dict) -> None:
            for writer in writers:
                for layer, (keys, values) in captured.items():
                    writer.append(layer, keys[0], values[0])

        engine.reset()
        engine.read(ids, retrieve=False, on_window=to_stores)
        engine.reset()
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return ids.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16000, 64000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "int8"])
    parser.add_argument("--model", default="smollm2-fot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tail", type=int, default=400, help="prompt tokens asked (the rest is read)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    rng = random.Random(args.seed)
    right: dict[tuple[int, str, str, bool], list[bool]] = {}
    with tempfile.TemporaryDirectory(dir=OUT) as directory:
        first = DocumentMemory.open(Path(directory) / args.dtypes[0], model=args.model, mem_dtype=args.dtypes[0])
        engine = first.engine
        memories = {args.dtypes[0]: first}
        for dtype in args.dtypes[1:]:  # the same engine: one model, one reading
            store = MemoryStore.open(Path(directory) / dtype)
            fingerprint = first.store.fingerprint
            store.bind_fingerprint({**fingerprint, "memory_config": {**fingerprint["memory_config"], "mem_dtype": dtype}})
            memories[dtype] = DocumentMemory(store, engine, read_with_retrieval=first.read_with_retrieval)
        try:
            for length in args.lengths:
                for depth in args.depths:
                    for trial in range(args.trials):
                        passkey = rng.randint(1, MAX_PASSKEY)
                        prompt = prompt_of_length(engine.tokenizer, length, depth, passkey)
                        offsets = engine.tokenizer(prompt, return_offsets_mapping=True,
                                                   add_special_tokens=False)["offset_mapping"]
                        cut = offsets[-args.tail][0]  # the tail starts at a token
                        head, tail = prompt[:cut], prompt[cut:]
                        started = time.perf_counter()
                        tokens = read_into(memories, head) + args.tail
                        read_s = time.perf_counter() - started
                        for dtype, memory in memories.items():
                            for mode, exact in SEARCHES:
                                asked = tail if mode == "memory" else QUESTION
                                answer = memory.ask(asked, chat=False, max_new_tokens=8, answer_mode=mode, exact=exact)
                                ok = is_correct(answer.text, passkey)
                                right.setdefault((length, dtype, mode, exact), []).append(ok)
                                print(f"{tokens} tokens, depth {depth}, trial {trial}, {dtype}, {mode}, "
                                      f"{'exact' if exact else 'index'}: {answer.text!r} ({'right' if ok else 'wrong'}; "
                                      f"passkey {passkey}; read {read_s:.0f} s)", flush=True)
                            memory.forget("haystack")
        finally:
            for memory in memories.values():
                memory.store.close()
            engine.close()
    asked = {"memory": "memory, the tail", "passages": "passages, the question"}
    header = ["prompt tokens", "store dtype"] + [f"{asked[mode]}, {'exact scan' if exact else 'index'}"
                                                 for mode, exact in SEARCHES]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for length in args.lengths:
        for dtype in args.dtypes:
            cells = [right[length, dtype, mode, exact] for mode, exact in SEARCHES]
            print("| " + " | ".join([f"~{length:,}", dtype] + [f"{sum(c)}/{len(c)}" for c in cells]) + " |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
