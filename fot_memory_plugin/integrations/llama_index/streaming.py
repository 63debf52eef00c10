"""Streaming for the LLM and the query engine: an answer generated in a thread, pieces as they come,
and deltas that add up to the text `complete` returns."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from ...documents.document_memory import Answer

__all__ = ["in_thread", "StrippedDeltas"]


def in_thread(ask: Callable[[Callable[[str], None]], Answer]) -> Iterator[str | Answer]:
    """Run `ask(on_text)` in a thread; yield its text pieces as they come, then its Answer."""
    pieces: queue.Queue[tuple[str, Any]] = queue.Queue()

    def work() -> None:
        try:
            pieces.put(("answer", ask(lambda piece: pieces.put(("text", piece)))))
        except BaseException as error:  # raised again in the consuming thread
            pieces.put(("error", error))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while True:
        kind, value = pieces.get()
        if kind == "text":
            yield value
        elif kind == "error":
            worker.join()
            raise value
        else:
            worker.join()
            yield value
            return


class StrippedDeltas:
    """Turns streamed pieces into deltas whose sum is the whole text stripped: leading whitespace
    is dropped, trailing whitespace held back until more text follows it."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        text = self._held + piece
        shown = text.rstrip()
        self._held = text[len(shown):]
        return shown
