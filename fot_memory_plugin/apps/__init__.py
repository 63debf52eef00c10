"""What runs fot-memory end to end: the `fot-memory` command and the evaluations.

- `cli.py`: the command line (`fot-memory`), its evaluation and training commands;
- `store_commands.py`: the store's commands (`read`, `ask`, `docs`, `forget`, `verify`, ...);
- `passkey.py`: the passkey retrieval benchmark and its heatmap;
- `perplexity.py`: perplexity of a held-out text as memory grows.
"""

__all__: list[str] = []
