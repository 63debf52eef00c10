"""The command line's Ray side: `read --ray`, `ask --ray` and `shard` (hooked into apps/cli.py).

Importing this module does not import Ray; the handlers do, and without it they raise
RayNotInstalledError, which the CLI prints with the pip command that installs the extra.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_ray_option", "add_shard_command", "read_on_ray", "open_on_ray"]

_RAY_HELP = ("run on Ray: a new local cluster, or the one at ADDRESS ('auto', '127.0.0.1:6379', "
             "'ray://host:10001'); put it after the other arguments or write --ray=ADDRESS")


def add_ray_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help=f"{what}; {_RAY_HELP}")


def add_shard_command(commands: argparse._SubParsersAction) -> None:
    shard = commands.add_parser("shard", help="split a store by document into N shard stores and a catalog "
                                              "(for `ask --ray --store OUT`)")
    shard.add_argument("store", metavar="STORE", help="the store to split (only read)")
    shard.add_argument("--shards", type=int, required=True, metavar="N", help="number of shards (<= documents)")
    shard.add_argument("out", metavar="OUT", help="a new directory: OUT/shard-NN/ and OUT/catalog.json")
    shard.set_defaults(handler=_shard)


def _address(args: argparse.Namespace) -> str | None:
    return args.ray or None  # "" (a bare --ray): a new local cluster


def read_on_ray(args: argparse.Namespace) -> int:
    """`fot-memory read PATH... --ray [ADDRESS]`: one Ray task per document."""
    from ..documents.document_memory import STORE_DEFAULTS, default_store_dir
    from .reading import read_corpus

    if args.name:
        raise ValueError("--name is not supported with --ray: documents are named by their file names.")
    config = None
    if args.mem_layers or args.local_window:
        from ..apps.cli import parse_layers

        layers = None if args.mem_layers in (None, "all") else parse_layers(args.mem_layers, num_layers=0)
        config = STORE_DEFAULTS.replace(mem_layers=layers, local_window=args.local_window or STORE_DEFAULTS.local_window)
    report = read_corpus(args.paths, args.store or default_store_dir(), ray_address=_address(args), model=args.model,
                         config=config, force=args.force, retrieve=args.retrieval, progress=not args.json)
    if args.json:
        print(json.dumps({"read": report.read, "skipped": report.skipped, "failed": report.failed,
                          "wall_s": round(report.wall_s, 3),
                          "timings": [timing.__dict__ for timing in report.timings]}))
    else:
        for timing in report.timings:
            print(f"{timing.name}: read on Ray, {timing.tokens} tokens ({timing.read_s:.1f} s; "
                  f"import {timing.import_s:.2f} s)")
        for name in report.skipped:
            print(f"{name}: already stored (use --force to read again)")
    report.raise_for_failures()
    return 0


def open_on_ray(args: argparse.Namespace):
    """The memory `fot-memory ask QUESTION --ray [ADDRESS] --store STORE_OR_CATALOG` answers from:
    the store's (or catalog's) shards held by Ray actors. The CLI asks and prints as without Ray."""
    from ..documents.document_memory import default_store_dir
    from .serving import open_sharded

    return open_sharded(args.store or default_store_dir(), ray_address=_address(args), device=args.device)


def _shard(args: argparse.Namespace) -> int:
    from .catalog import shard_paths, shard_store

    catalog = shard_store(Path(args.store), args.shards, Path(args.out))
    print(f"{args.store}: split into {args.shards} shards, catalog {catalog}")
    for shard in shard_paths(catalog)[1]:
        print(f"  {shard}")
    return 0
