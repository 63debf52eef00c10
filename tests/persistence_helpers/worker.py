"""Subprocess workers for the persistence tests (run with `python -m persistence_helpers.worker`).

  write STORE NAME SEED N [--sleep S] [--pause-at STEP] [--marker PATH] [--count C]
      read C synthetic documents NAME, NAME-1, ...; touch MARKER once writing started;
      with --pause-at, stop forever at that commit step (the test kills it there)
  search STORE LAYER QSEED K OUTDIR
      search every document of the store with hnswlib and exactly; save ids/keys/values/mask
      to OUTDIR/hnsw.npz and OUTDIR/exact.npz
  poll STORE READY STOP OUT
      reader: until the file STOP exists (at most 60 s), list documents and check each one fully
      (files, tokens, exact search) against the synthetic reference; touch READY after the first
      poll; write a JSON report to OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fot_memory_plugin.persistence import MemoryStore, StoreError, writer as writer_module

from . import synth


def _write(args: argparse.Namespace) -> None:
    marker = Path(args.marker) if args.marker else None

    def pause(step: str) -> None:
        if step == args.pause_at:
            marker.with_suffix(".paused").write_text(step)
            time.sleep(3600)

    writer_module.after_step = pause
    with MemoryStore.open(args.store, fingerprint=synth.fingerprint()) as store:
        for number in range(args.count):
            name = args.name if number == 0 else f"{args.name}-{number}"
            if marker is not None and number == 0:
                marker.write_text("started")
            synth.write_document(store, name, args.seed + number, args.n, window=256, sleep_s=args.sleep)


def _search(args: argparse.Namespace) -> None:
    with MemoryStore.open(args.store, readonly=True) as store:
        for exact, file_name in ((False, "hnsw.npz"), (True, "exact.npz")):
            memory = store.memory(args.layer, exact=exact, exact_below=0)
            hits = memory.search(synth.queries(args.qseed, 16, args.layer), args.k)
            np.savez(Path(args.outdir) / file_name, ids=hits.token_ids.numpy(), keys=hits.keys.numpy(),
                     values=hits.values.numpy(), mask=hits.mask.numpy(), doc_ids=np.array(memory.doc_ids))


def _check_document(store: MemoryStore, record, query) -> None:
    """Raise AssertionError unless the document is complete and searches like its reference."""
    seed, num_tokens = (int(part) for part in record.metadata["synthetic"].split(":"))
    assert record.num_tokens == num_tokens, (record.name, record.num_tokens, num_tokens)
    assert store.verify(record.id) == {}, record.name
    reference = [tuple(synth.stored(a) for a in synth.doc_arrays(seed, num_tokens, 0))]
    ids, keys, values = synth.brute_force(reference, query, 32)
    hits = store.memory(0, [record.id], exact=True).search(query, 32)
    assert np.array_equal(hits.token_ids[0].numpy(), ids), record.name
    assert np.array_equal(hits.values[0].numpy(), values), record.name


def _poll(args: argparse.Namespace) -> None:
    report = {"polls": 0, "counts_seen": [], "errors": []}
    query = synth.queries(7, 4)
    deadline = time.monotonic() + 60
    checked: set[str] = set()
    records: list = []
    with MemoryStore.open(args.store, readonly=True) as store:
        while time.monotonic() < deadline and not Path(args.stop).exists():
            try:
                records = store.documents()
                for record in records:
                    if record.id not in checked:  # each document fully checked once, first time seen
                        _check_document(store, record, query)
                        checked.add(record.id)
                    store.memory(0, [record.id]).search(query, 8)
            except (AssertionError, StoreError, OSError) as error:
                report["errors"].append(f"{type(error).__name__}: {error}")
            report["polls"] += 1
            if len(records) not in report["counts_seen"]:
                report["counts_seen"].append(len(records))
            Path(args.ready).touch()
            time.sleep(0.01)
    Path(args.out).write_text(json.dumps(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="persistence_helpers.worker")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write")
    for name, kind in (("store", str), ("name", str), ("seed", int), ("n", int)):
        write.add_argument(name, type=kind)
    write.add_argument("--sleep", type=float, default=0.0)
    write.add_argument("--pause-at", default=None)
    write.add_argument("--marker", default=None)
    write.add_argument("--count", type=int, default=1)
    search = commands.add_parser("search")
    for name, kind in (("store", str), ("layer", int), ("qseed", int), ("k", int), ("outdir", str)):
        search.add_argument(name, type=kind)
    poll = commands.add_parser("poll")
    for name in ("store", "ready", "stop", "out"):
        poll.add_argument(name)
    args = parser.parse_args(argv)
    {"write": _write, "search": _search, "poll": _poll}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
