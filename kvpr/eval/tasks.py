"""Long-context tasks built locally from seeds and scored by exact match.

- ``passkey``: a 5-digit key hidden in essay filler at a depth in [0, 1], asked at the end.
- ``kv_retrieval``: several "The special magic number for <word> is <n>." needles in essay filler;
  one word is asked (RULER-style multi-key retrieval).
- ``multi_doc``: Wikipedia leads (title, description, text) concatenated; the question gives one
  description and the answer is that article's exact title.

Prompts are plain completions that end where the answer should start ("... The pass key is"),
chosen on the default SmolLM2 (no chat template), 10 probe items at 1K/2K tokens: passkey ending in a
bare "The pass key is" 10/10 and 10/10; "Question: What is the pass key?\nAnswer: The pass key is"
9/10 and 8/10; "What is the pass key? The pass key is" 7/10 at 1K. Multi-document at 1K: title
before description 0/5, description before title 4/5. Depth is the fraction of the filler's tokens
that precede the asked needle. Not LongBench or RULER: not comparable with papers.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvpr.errors import KvprError
from kvpr.eval.corpus import Article, paul_graham_essays, tokenize_documents, wiki_articles

TASK_NAMES: tuple[str, ...] = ("passkey", "kv_retrieval", "multi_doc")

# Keys of the kv_retrieval needles: short, common, one word each, never a substring of another.
WORDS: tuple[str, ...] = tuple(
    "apple river candle falcon garden hammer island jacket kettle lemon mirror needle orange pepper "
    "rabbit saddle tiger violin window zebra anchor basket cactus dolphin engine forest guitar helmet "
    "igloo jungle ladder magnet napkin oyster parrot quartz rocket sponge tunnel walrus".split()
)

PASSKEY_HEADER = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it afterwards.\n\n"
)
KV_HEADER = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n\n"
)
DOC_HEADER = "Below are several encyclopedia articles, each with a description, a title and a text.\n\n"
DOC_SEPARATOR = "\n\n"
_CLOSE_ENOUGH = 2  # tokens: stop re-sizing a prompt once this near its target


@dataclass(frozen=True)
class TaskItem:
    """One prompt and the answer its continuation must start with."""

    task: str
    prompt: str
    answer: str
    depth: float  # fraction of the filler tokens before the asked needle
    length: int  # tokens of the prompt, as ``LLM.encode`` counts them
    target_len: int


def length_tolerance(target_len: int) -> int:
    """How far a prompt may miss its target length (items usually land within 2 tokens)."""
    return max(8, round(0.02 * target_len))


def depths(num_items: int) -> list[float]:
    """Evenly spaced depths 0..1 (one item: the middle)."""
    if num_items < 1:
        raise KvprError(f"num_items={num_items}: must be >= 1")
    return [0.5] if num_items == 1 else [item / (num_items - 1) for item in range(num_items)]


class TaskBuilder:
    """Makes seeded task items for one tokenizer; tokenizes each corpus once, on first use."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._filler: list[int] | None = None  # essay token stream
        self._stops: list[int] | None = None  # positions just after a sentence end in the stream
        self._articles: list[Article] | None = None
        self._doc_lens: dict[int, int] = {}  # article index -> tokens of its formatted text

    # -- public --------------------------------------------------------------------------------

    def items(self, task: str, target_len: int, num_items: int, seed: int) -> list[TaskItem]:
        """``num_items`` items of ``task`` at depths 0..1, each about ``target_len`` tokens long.

        Item ``index`` draws from ``Random(seed * 1_000_003 + index)``: the same seed gives the same
        items at every context length and for every cache config.
        """
        makers = {"passkey": self.passkey, "kv_retrieval": self.kv_retrieval, "multi_doc": self.multi_doc}
        if task not in makers:
            raise KvprError(f"unknown task {task!r}: use one of {', '.join(TASK_NAMES)}")
        return [
            makers[task](target_len, depth, seed * 1_000_003 + index) for index, depth in enumerate(depths(num_items))
        ]

    def passkey(self, target_len: int, depth: float, seed: int) -> TaskItem:
        rng = random.Random(seed)
        key = str(rng.randint(10_000, 99_999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        question = "The pass key is"
        return self._in_filler("passkey", PASSKEY_HEADER, [(depth, needle)], question, key, target_len, depth, rng)

    def kv_retrieval(self, target_len: int, depth: float, seed: int, num_needles: int = 8) -> TaskItem:
        rng = random.Random(seed)
        words = rng.sample(WORDS, num_needles)
        numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in words]
        needles = [f"The special magic number for {w} is {n}." for w, n in zip(words, numbers)]
        others = [rng.random() for _ in needles[1:]]
        question = f"What is the special magic number for {words[0]}? The special magic number for {words[0]} is"
        placed = [(depth, needles[0])] + list(zip(others, needles[1:]))
        return self._in_filler("kv_retrieval", KV_HEADER, placed, question, numbers[0], target_len, depth, rng)

    def multi_doc(self, target_len: int, depth: float, seed: int) -> TaskItem:
        rng = random.Random(seed)
        articles = self._wiki()
        target = rng.choice(self._answerable())
        question = f"Question: which article has this description?\nDescription: {articles[target].description}\nTitle:"
        budget = target_len - self._count(DOC_HEADER + question) - self._doc_len(target)
        if budget < 0:
            raise KvprError(f"target length {target_len} is shorter than one article: use at least 512 tokens")
        order = list(range(len(articles)))
        rng.shuffle(order)
        item: TaskItem | None = None
        for _attempt in range(4):  # re-size until the prompt measures within tolerance
            texts, lens = self._distractors(order, target, budget, target_len)
            offsets = [0]
            for length in lens:
                offsets.append(offsets[-1] + length)
            at = min(range(len(offsets)), key=lambda slot: abs(offsets[slot] - depth * offsets[-1]))
            texts.insert(at, self._doc_text(target) + DOC_SEPARATOR)
            real_depth = offsets[at] / offsets[-1] if offsets[-1] else 0.0
            item = self._item(
                "multi_doc", DOC_HEADER + "".join(texts) + question, articles[target].title, real_depth, target_len
            )
            if abs(item.length - target_len) <= _CLOSE_ENOUGH:
                break
            budget += target_len - item.length
        assert item is not None
        return item

    def _distractors(self, order: list[int], target: int, budget: int, target_len: int) -> tuple[list[str], list[int]]:
        """Whole articles in seeded order that fit ``budget`` tokens, then the head of one more to fill it."""
        chosen, used = [], 0
        for index in order[: 50 * max(1, target_len // 64)]:
            if budget - used < 8:
                break
            if index != target and used + self._doc_len(index) <= budget:
                chosen.append(index)
                used += self._doc_len(index)
        texts = [self._doc_text(i) + DOC_SEPARATOR for i in chosen]
        lens = [self._doc_len(i) for i in chosen]
        if budget - used >= 8:
            taken = set(chosen)
            spare = next(i for i in order if i != target and i not in taken)
            head = tokenize_documents(self.tokenizer, [self._doc_text(spare)])[0][: budget - used - 2]
            texts.append(self.tokenizer.decode(head) + DOC_SEPARATOR)
            lens.append(budget - used)
        return texts, lens

    # -- filler tasks --------------------------------------------------------------------------

    def _in_filler(
        self,
        task: str,
        header: str,
        needles: Sequence[tuple[float, str]],
        question: str,
        answer: str,
        target_len: int,
        depth: float,
        rng: random.Random,
    ) -> TaskItem:
        """Essay filler of the right size with each needle after the sentence end nearest its depth."""
        filler, stops = self._essays()
        fixed = self._count(header + "\n\n" + question) + sum(self._count(" " + text) for _, text in needles)
        budget = target_len - fixed
        if budget < 16:
            raise KvprError(f"target length {target_len} leaves no room for filler: use at least {fixed + 16}")
        first = bisect.bisect_left(stops, rng.randrange(0, len(filler) - 2 * budget))
        start = stops[first] if first < len(stops) else 0  # begin at a sentence start
        item: TaskItem | None = None
        for _attempt in range(4):  # re-size until the prompt measures within tolerance
            window = filler[start : start + budget]
            cuts = sorted((self._cut(stops, start, budget, d), text) for d, text in needles)
            pieces, previous = [], 0
            for cut, text in cuts:
                pieces += [self._decode_joined(window[previous:cut]), " " + text]
                previous = cut
            pieces += [self._decode_joined(window[previous:]), "\n\n", question]
            asked = self._cut(stops, start, budget, depth)
            prompt = header + "".join(pieces).lstrip(" ")
            item = self._item(task, prompt, answer, asked / budget, target_len)
            if abs(item.length - target_len) <= _CLOSE_ENOUGH:
                break
            budget += target_len - item.length
        assert item is not None
        return item

    def _decode_joined(self, ids: Sequence[int]) -> str:
        """Filler text that starts with whitespace, so a needle before it stays a separate sentence."""
        text = self.tokenizer.decode(list(ids))
        return text if not text or text[0].isspace() else " " + text

    def _cut(self, stops: list[int], start: int, budget: int, depth: float) -> int:
        """Offset in the window [start, start + budget] of the sentence end nearest ``depth``."""
        want = start + round(depth * budget)
        low, high = bisect.bisect_left(stops, start), bisect.bisect_right(stops, start + budget)
        pos = bisect.bisect_left(stops, want, low, high)
        near = stops[max(low, pos - 1) : min(high, pos + 1)]  # the stops either side of want
        best = min([start, start + budget, *near], key=lambda s: abs(s - want))  # window ends count as stops
        return best - start

    # -- corpora -------------------------------------------------------------------------------

    def _essays(self) -> tuple[list[int], list[int]]:
        if self._filler is None or self._stops is None:
            separator = tokenize_documents(self.tokenizer, ["\n\n"])[0]
            stream: list[int] = []
            for ids in tokenize_documents(self.tokenizer, [doc.text for doc in paul_graham_essays()]):
                stream.extend(ids + separator)
            ends = {tok for tok in set(stream) if self.tokenizer.decode([tok]).rstrip().endswith((".", "?", "!"))}
            self._filler = stream
            self._stops = [pos + 1 for pos, tok in enumerate(stream) if tok in ends]
        return self._filler, self._stops

    def _wiki(self) -> list[Article]:
        if self._articles is None:
            self._articles = wiki_articles()
        return self._articles

    def _answerable(self) -> list[int]:
        """Articles whose description is unique in the whole set and whose title is short."""
        articles = self._wiki()
        counts: dict[str, int] = {}
        for article in articles:
            counts[article.description] = counts.get(article.description, 0) + 1
        return [
            index
            for index, a in enumerate(articles)
            if a.description and counts[a.description] == 1 and len(a.title.split()) <= 3 and a.title.isascii()
        ]

    def _doc_text(self, index: int) -> str:
        a = self._wiki()[index]
        return f"Description: {a.description}\nTitle: {a.title}\nText: {a.extract}"

    def _doc_len(self, index: int) -> int:
        if index not in self._doc_lens:
            self._doc_lens[index] = self._count(self._doc_text(index) + DOC_SEPARATOR)
        return self._doc_lens[index]

    # -- measuring -----------------------------------------------------------------------------

    def _count(self, text: str) -> int:
        return len(tokenize_documents(self.tokenizer, [text])[0])

    def _item(self, task: str, prompt: str, answer: str, depth: float, target_len: int) -> TaskItem:
        length = len(self.tokenizer(prompt)["input_ids"])  # as LLM.encode counts, special tokens included
        return TaskItem(task, prompt, answer, depth, length, target_len)


def score_answer(continuation: str, answer: str) -> bool:
    """Exact match of ``answer`` at the start of ``continuation``.

    Leading whitespace and quotes/asterisks/colons are stripped; the answer must then be followed by
    the end of text or a character that cannot extend it (not a letter or digit), so "123456" does
    not match "12345" and "Romeo" does not match "Rome". Case-sensitive.
    """
    if not answer:
        raise KvprError("an empty answer cannot be scored")
    text = continuation.lstrip().lstrip("\"'*:`").lstrip()
    if not text.startswith(answer):
        return False
    rest = text[len(answer) :]
    return not rest or not rest[0].isalnum()
