"""Reading overhead: the plain model forward vs reading into in-RAM memory vs reading into the
persistent store, over the same windows of a real book, variants interleaved in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reading_overhead.py
    # = --tokens 8192 --repeats 2 --book persuasion.txt --readings none exact blocks --indexes hnsw clusters
    #   (SmolLM2-135M float32, store defaults)

Variants (memory in all 30 layers, or a FoT model's own layers; local window 512, top_k 32,
float16 memory as the store keeps):
  plain                 the unpatched decoder over the windows (no memory at all)
  RAM, <reading>        memory reading in RAM, each window appending its keys/values and
                        retrieving: nothing ("none"), the exact top-k ("exact", the reference),
                        or by block retrieval ("blocks", core/blocks.py: linear in the document)
  store <index>, <reading>   what `DocumentMemory.read_text` (`fot-memory read`) does: the same
                        reading, each window also written to a store document (DocumentWriter):
                        .kv writes and hnswlib inserts run on the writer's background thread,
                        then the commit (the rest of the indexes or the cluster indexes, saves,
                        fsyncs, SQLite), then what read_text keeps for answers
                        (DocumentMemory.prepare_answers: two probe forwards over the store)
--recall adds, per token count, one more block-retrieval reading that also runs the exact search
for every query and reports recall@k and the captured softmax mass (over all keys in memory)
of block retrieval against it, as the reading goes.
With several --writer-threads, one store variant per count (the store's layers spread over
that many background threads: what `fot-memory read --device cuda` does, where the hnswlib
inserts, not the model, limit reading). "store" times include the commit; the table also shows
the commit alone (what remains after the last window). A fresh store per run. Best of `repeats`
(another process on the machine only adds); CPU s is the process's CPU time over all its
threads, which other processes do not stretch.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import _real_keys as rk
from fot_memory_plugin import MemoryEngine
from fot_memory_plugin.core.blocks import BlockMemory
from fot_memory_plugin.core.memory import ExactMemory, Retrieved
from fot_memory_plugin.documents.document_memory import STORE_DEFAULTS, DocumentMemory
from fot_memory_plugin.persistence import IndexParams, MemoryStore, kvfile, writer

READINGS = ("none", "exact", "blocks")
# Store constants a run may vary, one store variant per value given:
# flag -> (module, constant, the flag's unit in the constant's, how a variant is named).
TUNABLES = {
    "kv_sync_mib": (kvfile, "SYNC_EVERY_BYTES", 1 << 20,
                    lambda mib: ".kv fsync at commit" if mib == 0 else f".kv flushed every {mib} MiB"),
    "gpu_stage_tokens": (writer, "GPU_STAGE_TOKENS", 1, lambda tokens: f"GPU stage {tokens} tokens"),
    "gpu_kept_keys_mib": (writer, "GPU_KEPT_KEYS_BYTES", 1 << 20,
                          lambda mib: "keys read back from the files" if mib == 0 else f"keys kept on the GPU ({mib} MiB)"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (memory in all 30 layers) or 'smollm2-fot' (its 5)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--book", type=Path, default=rk.BOOK)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); with 1 on 2 cores the "
                        "writer's background thread has a core of its own")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--writer-threads", type=int, nargs="+", default=[1],
                        help="store writer threads; one store variant per value (more pay when the model is on a GPU)")
    parser.add_argument("--readings", nargs="+", choices=READINGS, default=list(READINGS))
    parser.add_argument("--indexes", nargs="*", choices=("hnsw", "clusters"), default=["hnsw", "clusters"],
                        help="store index kinds; one store variant per reading and kind (none: no store variants)")
    parser.add_argument("--recall", action="store_true", help="also measure block retrieval's recall while reading")
    parser.add_argument("--sync-copies", action="store_true",
                        help="on a GPU, also each store variant handed CPU copies made in the reading loop "
                             "(how the writer took GPU windows before it copied them without waiting)")
    parser.add_argument("--kmeans", nargs="+", choices=("auto", "two-level", "flat"), default=["auto"],
                        help="the cluster indexes' k-means (IndexParams.kmeans), one store variant each")
    parser.add_argument("--kv-sync-mib", type=int, nargs="+", default=[kvfile.SYNC_EVERY_BYTES >> 20],
                        help="MiB a .kv file is written between flushes to disk while reading (0: all at "
                             "the commit's fsync), one store variant each")
    parser.add_argument("--gpu-stage-tokens", type=int, nargs="+", default=[writer.GPU_STAGE_TOKENS],
                        help="on a GPU, tokens staged per layer before one copy to the host (512: one copy "
                             "per window, as before staging), one store variant each")
    parser.add_argument("--gpu-kept-keys-mib", type=int, nargs="+", default=[writer.GPU_KEPT_KEYS_BYTES >> 20],
                        help="on a GPU, MiB of keys kept there for the commit's cluster index (0: read back "
                             "from the files), one store variant each")
    return parser.parse_args()


@torch.no_grad()
def plain(engine: MemoryEngine, ids: torch.Tensor) -> dict[str, float]:
    window = engine.config.local_window
    started = time.perf_counter()
    with engine.detached() as model:
        for start in range(0, ids.shape[1], window):
            model.model(input_ids=ids[:, start : start + window].to(engine.device), use_cache=False)
    _synchronize(engine)
    return {"total": time.perf_counter() - started}


def _synchronize(engine: MemoryEngine) -> None:
    """Wait for queued GPU work, so a timing covers it."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def fresh_memories(engine: MemoryEngine, reading: str) -> dict:
    """In-RAM memories for a reading mode (float16, as the store keeps)."""
    kind = BlockMemory if reading == "blocks" else ExactMemory
    return {layer: kind(dtype=torch.float16) for layer in engine.layers}


def in_ram(engine: MemoryEngine, ids: torch.Tensor, reading: str) -> dict[str, float]:
    engine.reset(fresh_memories(engine, reading))
    started = time.perf_counter()
    engine.read(ids, retrieve=reading != "none")
    _synchronize(engine)
    seconds = time.perf_counter() - started
    engine.reset()
    return {"total": seconds}


class RecallProbe(BlockMemory):
    """Block retrieval that also runs the exact search, keeping recall@k and captured mass."""

    def __init__(self) -> None:
        super().__init__(dtype=torch.float16)
        self.recalls: list[float] = []
        self.masses: list[float] = []

    def search(self, queries: torch.Tensor, k: int) -> Retrieved:
        found = super().search(queries, k)
        if len(self) > k:  # below that both return everything
            exact = ExactMemory.search(self, queries, k)
            found_scores = rk.hit_scores(queries, found.keys).masked_fill(~found.mask, float("-inf"))
            exact_scores = rk.hit_scores(queries, exact.keys)
            self.recalls.append(rk.recall_at_k(found_scores, exact_scores).mean().item())
            keys = self.keys.to(queries.dtype).repeat_interleave(queries.shape[1] // self.keys.shape[1], dim=1)
            normaliser = torch.logsumexp(queries @ keys.transpose(-1, -2) / math.sqrt(queries.shape[-1]), dim=-1)
            share = [torch.exp(s / math.sqrt(queries.shape[-1]) - normaliser[..., None]).sum(-1)
                     for s in (found_scores, exact_scores)]
            self.masses.append((share[0] / share[1]).mean().item())
        return found


def block_recall(engine: MemoryEngine, ids: torch.Tensor) -> dict[str, float]:
    """Read with block retrieval, measuring it against exact search on every query."""
    probes = {layer: RecallProbe() for layer in engine.layers}
    engine.reset(probes)
    engine.read(ids, retrieve=True)
    engine.reset()
    recalls = [value for probe in probes.values() for value in probe.recalls]
    masses = [value for probe in probes.values() for value in probe.masses]
    last = [probe.recalls[-1] for probe in probes.values() if probe.recalls]
    return {"recall": sum(recalls) / len(recalls), "mass": sum(masses) / len(masses),
            "recall_last_window": sum(last) / len(last), "worst_layer": min(
                sum(p.recalls) / len(p.recalls) for p in probes.values() if p.recalls)}


def to_store(engine: MemoryEngine, ids: torch.Tensor, reading: str, fingerprint: dict,
             threads: int = 1, index: str = "hnsw", sync_copies: bool = False,
             kmeans: str = "auto", tuned: dict[str, int] | None = None) -> dict[str, float]:
    """DocumentMemory.read_text's reading path (begin_document, read with on_window, commit);
    sync_copies: the writer gets each window as CPU tensors copied (and waited for) here;
    tuned: TUNABLES set for this run ({flag: value in the flag's unit})."""
    rk.OUT.mkdir(parents=True, exist_ok=True)
    defaults = {flag: getattr(TUNABLES[flag][0], TUNABLES[flag][1]) for flag in tuned or {}}
    for flag, value in (tuned or {}).items():
        module, constant, unit, _ = TUNABLES[flag]
        setattr(module, constant, value * unit)
    try:
        with tempfile.TemporaryDirectory(dir=rk.OUT) as directory:
            with MemoryStore.open(directory, fingerprint=fingerprint) as store:
                engine.reset(fresh_memories(engine, reading))
                started = time.perf_counter()
                digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
                with store.begin_document("book", sha256=digest, text_length=ids.shape[1], dtype="float16",
                                          threads=threads, index_params=IndexParams(kind=index, kmeans=kmeans),
                                          index_device=None if engine.device.type == "cpu" else str(engine.device)) as writer:

                    def write(start: int, end: int, captured: rk.Window) -> None:
                        for layer, (keys, values) in captured.items():
                            if sync_copies:
                                keys, values = keys.cpu(), values.cpu()
                            writer.append(layer, keys[0], values[0])  # (Hkv, T, D)

                    engine.read(ids, retrieve=reading != "none", on_window=write)
                    tokens = ids.shape[1]  # chunks of ~a sentence, for the sources (chars stand for tokens here)
                    writer.add_chunks((start, min(start + 48, tokens), start, min(start + 48, tokens), "")
                                      for start in range(0, tokens, 48))
                    read = time.perf_counter()
                finished = time.perf_counter()
                engine.reset()
                # What read_text does next: keep the baseline probe's shares for answers, searching the
                # store as an ask does (this engine's "exact" config is for reading from RAM).
                reading_config = engine.config
                engine.config = reading_config.replace(retrieval=STORE_DEFAULTS.retrieval)
                try:
                    DocumentMemory(store, engine).prepare_answers()
                finally:
                    engine.config = reading_config
                    engine.reset()
                prepared = time.perf_counter()
    finally:
        for flag, value in defaults.items():
            setattr(TUNABLES[flag][0], TUNABLES[flag][1], value)
    steps = {f"commit {step}": seconds for step, seconds in writer.commit_seconds.items()}
    return {"total": prepared - started, "commit": finished - read, "prepare": prepared - finished, **steps}


def _with_cpu_time(run: Callable[[torch.Tensor], dict[str, float]]) -> Callable[[torch.Tensor], dict[str, float]]:
    """Adds "cpu": CPU seconds of this process, all threads (other processes on a shared machine
    stretch wall time, not this)."""

    def timed(ids: torch.Tensor) -> dict[str, float]:
        started = time.process_time()
        result = run(ids)
        return {**result, "cpu": time.process_time() - started}

    return timed


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = STORE_DEFAULTS.replace(retrieval="exact")  # reading retrieves from RAM in both cases
    loaded, engine = rk.load_engine(config, model=args.model, device=args.device)
    fingerprint = rk.fingerprint(loaded, config, engine.layers)
    book_ids = rk.book_ids(engine, args.book)[None]
    engine.read(book_ids[:, : config.local_window])  # warm-up
    variants: list[tuple[str, Callable[[torch.Tensor], dict[str, float]]]] = [("plain", lambda ids: plain(engine, ids))]
    for reading in args.readings:
        variants.append((f"RAM, {reading}", lambda ids, reading=reading: in_ram(engine, ids, reading)))
        for index in args.indexes:
            for threads in args.writer_threads:
                for sync in (False, True) if args.sync_copies else (False,):
                    varied = [flag for flag in TUNABLES if len(getattr(args, flag)) > 1]
                    for kmeans, *values in itertools.product(args.kmeans if index == "clusters" else ["auto"],
                                                             *(getattr(args, flag) for flag in TUNABLES)):
                        tuned = dict(zip(TUNABLES, values))
                        name = ", ".join([f"store {index}, {reading}"]
                                         + ([] if args.writer_threads == [1] else [f"{threads} writer threads"])
                                         + (["sync copies"] if sync else [])
                                         + ([] if len(args.kmeans) == 1 else [f"{kmeans} k-means"])
                                         + [TUNABLES[flag][3](tuned[flag]) for flag in varied])
                        variants.append((name, lambda ids, reading=reading, threads=threads, index=index, sync=sync,
                                         kmeans=kmeans, tuned=tuned: to_store(engine, ids, reading, fingerprint,
                                                                              threads, index, sync, kmeans, tuned)))
    variants = [(name, _with_cpu_time(run)) for name, run in variants]
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    recalls: dict[int, dict[str, float]] = {}
    for tokens in args.tokens:
        ids = book_ids[:, :tokens]
        for repeat in range(args.repeats):
            for name, run in variants:
                results.setdefault((tokens, name), []).append(run(ids))
                print(f"{tokens} tokens, repeat {repeat + 1}, {name}: {results[tokens, name][-1]}", flush=True)
        if args.recall:
            recalls[tokens] = block_recall(engine, ids)
            print(f"{tokens} tokens, block retrieval vs exact while reading: {recalls[tokens]}", flush=True)
    print(f"\nSmolLM2-135M float32 on {engine.device}, {torch.get_num_threads()} torch threads, memory in {len(engine.layers)} layers, "
          f"window {config.local_window}, top_k {config.top_k}, {args.book.name}; best of {args.repeats}\n")
    header = ["tokens", "variant", "wall s", "tokens/s", "x plain", "x RAM (same retrieval)", "commit s",
              "prepare s", "CPU s", "CPU x plain", "CPU x RAM"]
    rows = []
    for tokens in args.tokens:
        best = {name: min(results[tokens, name], key=lambda r: r["total"]) for name, _ in variants}
        cpu = {name: min(r["cpu"] for r in results[tokens, name]) for name, _ in variants}
        for name, _ in variants:
            seconds = best[name]["total"]
            ram = "RAM, " + name.split(", ")[1] if name.startswith("store") else None
            rows.append([tokens, name, f"{seconds:.1f}", f"{tokens / seconds:.0f}",
                         f"{seconds / best['plain']['total']:.2f}",
                         "-" if ram is None else f"{seconds / best[ram]['total']:.2f}",
                         f"{best[name]['commit']:.2f}" if "commit" in best[name] else "-",
                         f"{best[name]['prepare']:.2f}" if "prepare" in best[name] else "-",
                         f"{cpu[name]:.1f}", f"{cpu[name] / cpu['plain']:.2f}",
                         "-" if ram is None else f"{cpu[name] / cpu[ram]:.2f}"])
    print(rk.markdown_table(header, rows))
    if recalls:
        print(f"\nblock retrieval while reading, against exact search of the same memory (recall@{config.top_k} "
              "with ties, captured softmax mass over all keys in memory; means over every search):\n")
        print(rk.markdown_table(["tokens", "recall", "worst layer", "last window's recall", "captured mass"],
                                [[tokens, f"{r['recall']:.3f}", f"{r['worst_layer']:.3f}", f"{r['recall_last_window']:.3f}",
                                  f"{r['mass']:.3f}"] for tokens, r in recalls.items()]))
    engine.close()


if __name__ == "__main__":
    main()
