"""Questions about memory: training windows that ask about a fact only the previous window holds.

The language-model loss alone teaches the memory layers to find repeated strings (a passkey, a
pasted passage), not to carry a fact into an answer. Here a share of the documents in a batch
get their current window rewritten to START with a question, then its answer, then the
document's own text:

    previous window:  ... Mr. Bingley had not been of age two years, when he was tempted ...
    current window:   [user: Complete this line of the text: "... when he was tempted by an
                      accidental recommendation to look at"] [assistant: Netherfield<end>] ...

so the local context holds the question and nothing else, as when `ask` answers from a store.
Two kinds of fact, each asked in completion form (raw text to continue) and question form (the
tokenizer's chat template, as `ask` uses by default):

- a real sentence of the previous window, cut before a name or number it holds (a cloze);
- an invented fact ("Emma's lucky number was 4187.") written into the previous window at a
  sentence start, asked about in words that differ from the fact's own.

The answer tokens (and the chat template's end of turn) are the targets of a separate loss
(`answer_mask`), added to the plain cross-batch loss, which keeps perplexity from regressing.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["QuestionMaker", "Question", "ask_in_windows"]

# Share of questions asked in question form (chat template). smollm2-fot already copies a fact from
# memory into a completion (answer loss 0.20 with the fact's window in memory vs 4.7 without) but
# barely into a chat answer (6.3 vs 8.0; 48 windows of Emma): question form is what it must learn.
QUESTION_FORM_SHARE = 0.7

# One invented fact: (a name's attribute, how its statement reads, how a question asks for it).
# The values are drawn from VALUE_KINDS; none of these phrasings is the QA benchmark's.
ATTRIBUTES = (
    ("lucky number", "{name}'s lucky number was {value}.", "What was {name}'s lucky number?", "number"),
    ("door code", "The code of the door to {name}'s study was {value}.", "Which code opened {name}'s study door?", "number"),
    ("horse", "{name} rode a brown mare called {value}.", "What was the name of {name}'s mare?", "word"),
    ("dog", "{name} kept a little terrier named {value}.", "What was {name}'s terrier called?", "word"),
    ("cousin", "{name} had a cousin in the navy called Captain {value}.", "Who was {name}'s cousin in the navy?", "word"),
    ("birthplace", "{name} was born in the village of {value}.", "In which village was {name} born?", "word"),
    ("colour", "{name}'s favourite ribbon was {value}.", "What colour was {name}'s favourite ribbon?", "colour"),
    ("year", "{name} first went to London in {value}.", "In which year did {name} first go to London?", "year"),
    ("song", "{name} always sang a ballad called {value}.", "Which ballad did {name} always sing?", "word"),
    ("boat", "{name}'s little boat was painted with the name {value}.", "What name was painted on {name}'s boat?", "word"),
)
VALUE_WORDS = (
    "Ashcombe", "Brindle", "Corvale", "Dunmore", "Elderwick", "Fenhollow", "Garroway", "Hazelmere", "Ivybridge",
    "Juniper", "Kestrel", "Larkspur", "Marlowe", "Nettlefield", "Oakhurst", "Pennyroyal", "Quillon", "Rosemoor",
    "Saffron", "Thistledown", "Umberley", "Vespera", "Willowby", "Yarrow", "Zephyrine", "Bramblecote", "Cinder",
    "Dovecote", "Ember", "Foxglove", "Gossamer", "Heron", "Islay", "Jasper", "Kingcup", "Lavender", "Merriweather",
)
COLOURS = ("crimson", "saffron", "violet", "emerald", "scarlet", "amber", "indigo", "silver", "lilac", "coral")
FALLBACK_NAMES = ("Harriet", "Edmund", "Lucy", "Frederick", "Margaret", "Charles", "Isabella", "Henry", "Fanny", "Robert")

# How a cloze on a real sentence is asked in question form; {prefix} is the sentence up to the answer.
CLOZE_QUESTIONS = (
    'Complete this line of the text: "{prefix} ..."',
    'In the text, what comes next after "{prefix}"?',
    'Which name or number finishes this sentence from the text: "{prefix} ..."?',
)

_SENTENCE = re.compile(r"[^.!?\n]*[.!?]")
_CANDIDATE = re.compile(r"\b(?:[A-Z][a-z]{2,}(?: [A-Z][a-z]{2,})?|\d{2,4})\b")
_COMMON_CAPITALS = {"The", "This", "That", "There", "Then", "They", "She", "Her", "His", "And", "But", "What",
                    "When", "Where", "Which", "Who", "You", "Your", "Yes", "Our", "Not", "For", "With", "Sir",
                    "Lady", "Miss", "Mrs", "Chapter", "CHAPTER", "God", "Heaven", "Lord"}
# a name inside a sentence (after a lower-case word or a comma), so not any sentence's first word
_NAME = re.compile(r"(?<=[a-z,;] )(?:Mr\. |Mrs\. |Miss |Captain |Lady |Sir )?[A-Z][a-z]{2,}\b")


@dataclass(frozen=True)
class Question:
    prompt: list[int]  # tokens the current window starts with
    answer: list[int]  # target tokens right after the prompt
    previous: list[int] | None  # the previous window rewritten (an invented fact), or None: unchanged
    kind: str  # "cloze" or "fact"
    form: str  # "completion" or "question"


class QuestionMaker:
    """Questions about a previous window, tokenized with the model's own tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        # tokens that end a sentence: where an invented fact may start without cutting one
        self.sentence_ends = {token for token in range(len(tokenizer))
                              if tokenizer.decode([token]).rstrip().endswith((".", "!", "?"))}

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def make(self, previous: torch.Tensor, rng: random.Random, max_tokens: int) -> Question | None:
        """A question about `previous` (W,) whose prompt and answer take at most max_tokens, or
        None when the window offers no usable fact (then the window trains as plain text)."""
        form = "question" if self.chat and rng.random() < QUESTION_FORM_SHARE else "completion"
        text = " ".join(self.tokenizer.decode(previous.tolist()).split())  # prose, not its line breaks
        for kind in (("cloze", "fact") if rng.random() < 0.5 else ("fact", "cloze")):
            made = self._cloze(text, form, rng) if kind == "cloze" else self._fact(previous, text, form, rng)
            if made is not None and len(made.prompt) + len(made.answer) <= max_tokens:
                return made
        return None

    def _cloze(self, text: str, form: str, rng: random.Random) -> Question | None:
        # whole sentences only: the window's first and last sentences may be cut
        sentences = [m for m in _SENTENCE.finditer(text)][1:-1]
        rng.shuffle(sentences)
        for sentence in sentences:
            words = sentence.group().strip()
            found = [m for m in _CANDIDATE.finditer(words) if m.group() not in _COMMON_CAPITALS
                     and len(words[: m.start()].split()) >= 5]
            if not found:
                continue
            answer = rng.choice(found)
            prefix = " ".join(words[: answer.start()].split()[-24:])  # the words just before the answer
            if form == "completion":
                return Question(self._encode(prefix), self._encode(" " + answer.group()), None, "cloze", form)
            question = rng.choice(CLOZE_QUESTIONS).format(prefix=prefix)
            return Question(*self._chat(question, answer.group()), None, "cloze", form)
        return None

    def _fact(self, previous: torch.Tensor, text: str, form: str, rng: random.Random) -> Question | None:
        names = [n for n in _NAME.findall(text) if n.split()[-1] not in _COMMON_CAPITALS]
        name = rng.choice(names) if names else rng.choice(FALLBACK_NAMES)
        _, statement, asked, value_kind = rng.choice(ATTRIBUTES)
        value = {"number": lambda: str(rng.randint(1000, 9999)), "year": lambda: str(rng.randint(1700, 1830)),
                 "colour": lambda: rng.choice(COLOURS), "word": lambda: rng.choice(VALUE_WORDS)}[value_kind]()
        fact = self._encode(" " + statement.format(name=name, value=value))
        window = previous.shape[0]
        if len(fact) > window // 4:
            return None
        # after a sentence end somewhere in the window (not in its last quarter, so the fact stays whole)
        ends = [i + 1 for i, token in enumerate(previous.tolist()[: window - len(fact)]) if token in self.sentence_ends]
        at = rng.choice(ends) if ends else rng.randrange(window - len(fact))
        rewritten = (previous.tolist()[:at] + fact + previous.tolist()[at:])[:window]
        if form == "completion":
            cue = statement.format(name=name, value="\0").split("\0")[0].rstrip()
            return Question(self._encode(cue), self._encode(" " + value), rewritten, "fact", form)
        return Question(*self._chat(asked.format(name=name), value), rewritten, "fact", form)

    def _chat(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt, answer) tokens in the chat template: the answer ends with its end of turn."""
        user = [{"role": "user", "content": question}]
        prompt = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):  # a template that rewrites earlier turns: keep the answer bare
            return self._encode(prompt), self._encode(answer)
        reply = full[len(prompt):].rstrip("\n")
        return self._encode(prompt), self._encode(reply)


def ask_in_windows(maker: QuestionMaker, previous: torch.Tensor, current: torch.Tensor, probability: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Rewrite a share `probability` of the (N, W) windows in place to ask about their previous
    window; returns the (N, W) mask of answer tokens in the current windows (the answer loss's targets)."""
    docs, window = current.shape
    mask = torch.zeros_like(current, dtype=torch.bool)
    rng = random.Random(int(torch.randint(2**31 - 1, (1,), generator=generator)))
    for doc in range(docs):
        if rng.random() >= probability:
            continue
        question = maker.make(previous[doc], rng, max_tokens=window // 2)
        if question is None:
            continue
        if question.previous is not None:
            previous[doc] = torch.tensor(question.previous, dtype=previous.dtype)
        asked = question.prompt + question.answer
        current[doc] = torch.cat([torch.tensor(asked, dtype=current.dtype), current[doc, : window - len(asked)]])
        mask[doc, len(question.prompt) : len(asked)] = True
    return mask
