"""Long-context tasks built locally from seeds, split into a context (prefilled and compressed by
the cache method) and a short question (run through the compressed cache), scored by exact match.

- ``passkey``: a 5-digit key hidden in essay filler, asked at the end.
- ``kv_retrieval``: 8 "The special magic number for <word> is <n>." needles; one word is asked.
- ``multi_key``, ``multi_value``, ``variable_tracking``, ``common_words``: RULER's families, built
  in ``tasks_ruler.py`` (wordings and their scores are noted there).
- ``multi_doc``: Wikipedia leads (description, title, text) concatenated; the question gives one
  description and the answer is that article's exact title.

No needle (asked or not) lies in the last ``guard_tokens`` tokens of a context, the recent window
every cache method keeps: retrieval must come from the compressed part. Item depths (the fraction
of context tokens before the first asked needle) are spread evenly over the rest.

Prompts are plain completions that end where the answer should start, chosen on the default
SmolLM2-135M (no chat template). Measured uncompressed (fp32 CPU, greedy, the whole prompt
prefilled, 10 items at 1024 tokens), items correct with guard 0 / guard 256: passkey 10/10 / 9/10,
kv_retrieval 10/10 / 8/10, multi_doc 9/10 / 9/10; the RULER families in ``tasks_ruler.py``.
Earlier probes: a bare "The pass key is" beat "Question: What is the pass key?\nAnswer: The pass
key is" (10/10 against 9/10 at 1K); in multi_doc a description before the title 4/5, the title
first 0/5. Not LongBench or RULER: not comparable with papers.
"""

from __future__ import annotations

import bisect
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvpr.errors import KvprError
from kvpr.eval import tasks_ruler
from kvpr.eval.corpus import Article, paul_graham_essays, tokenize_documents, wiki_articles
from kvpr.eval.tasks_ruler import KV_HEADER, WORDS

TASK_NAMES: tuple[str, ...] = (
    "passkey",
    "kv_retrieval",
    "multi_key",
    "multi_value",
    "variable_tracking",
    "common_words",
    "multi_doc",
)
MULTI_ANSWER_TASKS: frozenset[str] = frozenset({"multi_value", "variable_tracking", "common_words"})

PASSKEY_HEADER = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it afterwards.\n\n"
)
DOC_HEADER = "Below are several encyclopedia articles, each with a description, a title and a text.\n\n"
DOC_SEPARATOR = "\n\n"
_CLOSE_ENOUGH = 2  # tokens: stop re-sizing a prompt once this near its target
_GUARD_MARGIN = 4  # tokens kept beyond the guard, for seams where re-tokenising shifts a token or two
_ANSWER_SLACK = 2  # tokens of answer budget beyond the answer itself (a leading space, a stop)


@dataclass(frozen=True)
class TaskItem:
    """One item: the context (prefilled, then compressed), the question (run through the compressed
    cache) and every string its continuation must contain."""

    task: str
    context: str  # everything before the question; prefilled and compressed
    question: str  # run through the compressed cache; context + question is the prompt
    answers: tuple[str, ...]  # every string the continuation must contain (one for single-answer tasks)
    depth: float  # fraction of the context's tokens before the (first) asked needle, in [0, 1]
    length: int  # tokens of context + question as tokenizer(prompt)["input_ids"] counts
    target_len: int
    max_new_tokens: int  # answer budget this task needs (tokens)

    def __post_init__(self) -> None:
        if not self.answers or not all(self.answers) or not 0.0 <= self.depth <= 1.0 or self.max_new_tokens < 1:
            raise KvprError(f"{self.task} item: needs answers, a depth in [0, 1] and max_new_tokens >= 1")

    @property
    def prompt(self) -> str:
        return self.context + self.question


def length_tolerance(target_len: int) -> int:
    """How far a prompt may miss its target length (items usually land within 2 tokens)."""
    return max(8, round(0.02 * target_len))


def depths(num_items: int) -> list[float]:
    """Evenly spaced fractions 0..1 of the allowed region (one item: the middle)."""
    if num_items < 1:
        raise KvprError(f"num_items={num_items}: must be >= 1")
    return [0.5] if num_items == 1 else [item / (num_items - 1) for item in range(num_items)]


def depth_band(depth: float, num_bands: int = 4) -> str:
    """The band of equal width holding ``depth``, as "0.25-0.50" (1.0 falls in the last band)."""
    if num_bands < 1 or not 0.0 <= depth <= 1.0:
        raise KvprError(f"depth={depth}, num_bands={num_bands}: need depth in [0, 1] and num_bands >= 1")
    band = min(int(depth * num_bands), num_bands - 1)
    return f"{band / num_bands:.2f}-{(band + 1) / num_bands:.2f}"


class TaskBuilder:
    """Makes seeded task items for one tokenizer; tokenizes each corpus once, on first use.

    ``guard_tokens``: no needle or answer-bearing text in the last this many tokens of a context
    (the harness passes the largest recent window of any cache method in the run).
    """

    def __init__(self, tokenizer: Any, guard_tokens: int = 0) -> None:
        if guard_tokens < 0:
            raise KvprError(f"guard_tokens={guard_tokens}: must be >= 0")
        self.tokenizer = tokenizer
        self.guard_tokens = guard_tokens
        self._filler: list[int] | None = None  # essay token stream
        self._stops: list[int] | None = None  # positions just after a sentence end in the stream
        self._articles: list[Article] | None = None
        self._doc_lens: dict[int, int] = {}  # article index -> tokens of its formatted text
        self._words: list[str] | None = None

    # -- public --------------------------------------------------------------------------------

    def items(self, task: str, target_len: int, num_items: int, seed: int) -> list[TaskItem]:
        """``num_items`` items of ``task``, about ``target_len`` tokens of context + question each,
        their asked needles spread evenly over the context outside the guard.

        Item ``index`` draws from ``Random(seed * 1_000_003 + index)``: the same seed gives the same
        items at every context length and for every cache config.
        """
        makers: dict[str, Callable[[TaskBuilder, int, float, int], TaskItem]] = {
            "passkey": TaskBuilder.passkey,
            "kv_retrieval": TaskBuilder.kv_retrieval,
            "multi_key": tasks_ruler.multi_key,
            "multi_value": tasks_ruler.multi_value,
            "variable_tracking": tasks_ruler.variable_tracking,
            "common_words": tasks_ruler.common_words,
            "multi_doc": TaskBuilder.multi_doc,
        }
        if task not in makers:
            raise KvprError(f"unknown task {task!r}: use one of {', '.join(TASK_NAMES)}")
        return [
            makers[task](self, target_len, fraction, seed * 1_000_003 + index)
            for index, fraction in enumerate(depths(num_items))
        ]

    def passkey(self, target_len: int, fraction: float, seed: int) -> TaskItem:
        rng = random.Random(seed)
        key = str(rng.randint(10_000, 99_999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        question = "\n\nThe pass key is"
        return self.in_filler("passkey", PASSKEY_HEADER, [(fraction, needle)], question, (key,), target_len, rng)

    def kv_retrieval(self, target_len: int, fraction: float, seed: int, num_needles: int = 8) -> TaskItem:
        rng = random.Random(seed)
        words = rng.sample(WORDS, num_needles)
        numbers = [str(number) for number in rng.sample(range(1_000_000, 10_000_000), num_needles)]
        needles = [f"The special magic number for {w} is {n}." for w, n in zip(words, numbers)]
        placed = [(fraction, needles[0])] + [(rng.random(), needle) for needle in needles[1:]]
        question = f"\n\nWhat is the special magic number for {words[0]}? The special magic number for {words[0]} is"
        return self.in_filler("kv_retrieval", KV_HEADER, placed, question, (numbers[0],), target_len, rng)

    def multi_doc(self, target_len: int, fraction: float, seed: int) -> TaskItem:
        rng = random.Random(seed)
        articles = self._wiki()
        target = rng.choice(self._answerable())
        title = articles[target].title
        question = f"Question: which article has this description?\nDescription: {articles[target].description}\nTitle:"
        budget = target_len - self.count(DOC_HEADER + question) - self._doc_len(target)
        if budget < self.guard_tokens + _GUARD_MARGIN:
            raise KvprError(
                f"multi_doc at {target_len} tokens leaves no room beside guard_tokens={self.guard_tokens}: "
                f"use a context of at least {target_len - budget + self.guard_tokens + _GUARD_MARGIN} tokens"
            )
        order = [index for index in range(len(articles)) if title not in self._doc_text(index)]
        rng.shuffle(order)
        item: TaskItem | None = None
        for _attempt in range(4):  # re-size until the prompt measures within tolerance
            room = budget - self.guard_tokens - _GUARD_MARGIN  # distractor tokens the target may follow
            before, used = self._whole_docs(order, round(fraction * room), set())
            after, _ = self._whole_docs(order, budget - used, set(before))
            head = DOC_HEADER + "".join(self._doc_text(i) + DOC_SEPARATOR for i in before)
            tail = "".join(self._doc_text(i) + DOC_SEPARATOR for i in after)
            spare = budget - used - sum(self._doc_len(i) for i in after)  # filled by the head of one more
            if spare >= 8:
                extra = next(i for i in order if i not in before and i not in after)
                ids = tokenize_documents(self.tokenizer, [self._doc_text(extra)])[0][: spare - 2]
                tail += self.tokenizer.decode(ids) + DOC_SEPARATOR
            context = head + self._doc_text(target) + DOC_SEPARATOR + tail
            item = self.make_item("multi_doc", context, question, (title,), len(head), target_len)
            if abs(item.length - target_len) <= _CLOSE_ENOUGH:
                break
            budget += target_len - item.length
        assert item is not None
        return item

    def _whole_docs(self, order: list[int], budget: int, taken: set[int]) -> tuple[list[int], int]:
        """Articles in seeded order, skipping ``taken``, that fit ``budget`` tokens; and their tokens."""
        chosen, used = [], 0
        for index in order[: 50 * max(1, budget // 64)]:  # enough to come close; each is tokenised once
            if budget - used < 24:  # close enough: the shortest articles are about this long
                break
            if index not in taken and used + self._doc_len(index) <= budget:
                chosen.append(index)
                used += self._doc_len(index)
        return chosen, used

    # -- filler tasks --------------------------------------------------------------------------

    def in_filler(
        self,
        task: str,
        header: str,
        needles: Sequence[tuple[float, str]],
        question: str,
        answers: tuple[str, ...],
        target_len: int,
        rng: random.Random,
        max_new_tokens: int | None = None,
    ) -> TaskItem:
        """Essay filler of the right size, each needle after the sentence end nearest its fraction of
        the region outside the guard; ``needles[0]`` is the asked one (its start sets the depth).

        ``max_new_tokens`` defaults to the first answer's tokens plus a little slack.
        """
        filler, stops = self._essays()
        fixed = self.count(header) + self.count(question) + sum(self.count(" " + text) for _, text in needles)
        budget = target_len - fixed
        if budget - self.guard_tokens - _GUARD_MARGIN < 0:
            raise KvprError(
                f"{task} at {target_len} tokens leaves no room for its needles beside guard_tokens="
                f"{self.guard_tokens}: use a context of at least {fixed + self.guard_tokens + _GUARD_MARGIN} tokens"
            )
        start = self.filler_start(rng, budget)
        shrink = 0  # tokens the needles' region loses where re-tokenising ate into the guard
        item: TaskItem | None = None
        for _attempt in range(6):  # re-size until the prompt measures within tolerance, guard kept
            window = filler[start : start + budget]
            limit = max(0, budget - self.guard_tokens - _GUARD_MARGIN - shrink)
            cuts = [self._cut(stops, start, limit, fraction) for fraction, _ in needles]
            order = sorted(range(len(needles)), key=lambda needle: (cuts[needle], needle))
            body, previous, asked_at, last_end = "", 0, 0, 0
            for needle in order:
                body += self._decode_joined(window[previous : cuts[needle]]) + " "
                if needle == 0:
                    asked_at = len(body)
                body += needles[needle][1]
                last_end, previous = len(body), cuts[needle]
            body += self._decode_joined(window[previous:])
            stripped = len(body) - len(body.lstrip(" "))
            context = header + body[stripped:]
            asked_at, last_end = len(header) + asked_at - stripped, len(header) + last_end - stripped
            item = self.make_item(task, context, question, answers, asked_at, target_len, max_new_tokens)
            deficit = self.guard_tokens - self.count(context[last_end:])
            if deficit > 0:
                shrink += deficit + 1
            elif abs(item.length - target_len) <= _CLOSE_ENOUGH:
                break
            budget += target_len - item.length
        assert item is not None and self.count(item.context[last_end:]) >= self.guard_tokens, task
        return item

    def filler_start(self, rng: random.Random, num_tokens: int) -> int:
        """A seeded sentence start in the essay stream with ``2 * num_tokens`` tokens after it."""
        filler, stops = self._essays()
        first = bisect.bisect_left(stops, rng.randrange(0, max(1, len(filler) - 2 * num_tokens)))
        return stops[first] if first < len(stops) else 0

    def filler_text(self, start: int, num_tokens: int) -> str:
        """``num_tokens`` tokens of essay from stream position ``start``, decoded."""
        return self.tokenizer.decode(self._essays()[0][start : start + num_tokens])

    def _decode_joined(self, ids: Sequence[int]) -> str:
        """Filler text that starts with whitespace, so a needle before it stays a separate sentence."""
        text = self.tokenizer.decode(list(ids))
        return text if not text or text[0].isspace() else " " + text

    def _cut(self, stops: list[int], start: int, limit: int, fraction: float) -> int:
        """Offset in the window of the sentence end in [start, start + limit] nearest ``fraction`` of it."""
        want = start + round(fraction * limit)
        low, high = bisect.bisect_left(stops, start), bisect.bisect_right(stops, start + limit)
        pos = bisect.bisect_left(stops, want, low, high)
        near = stops[max(low, pos - 1) : min(high, pos + 1)]  # the stops either side of want
        return min([start, *near], key=lambda stop: abs(stop - want)) - start  # the window start counts

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

    def word_pool(self) -> list[str]:
        """Lowercase essay words of 4-10 letters that are one token after a space, past the 150 most
        frequent (function words), sorted: the vocabulary of ``common_words``."""
        if self._words is None:
            counts = Counter(re.findall(r"[a-z']+", " ".join(doc.text for doc in paul_graham_essays())))
            ranked = [word for word, _ in counts.most_common()[150:] if 4 <= len(word) <= 10 and word.isalpha()]
            ids = tokenize_documents(self.tokenizer, [" " + word for word in ranked])
            self._words = sorted(word for word, one in zip(ranked, ids) if len(one) == 1)
        return self._words

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
            self._doc_lens[index] = self.count(self._doc_text(index) + DOC_SEPARATOR)
        return self._doc_lens[index]

    # -- measuring -----------------------------------------------------------------------------

    def count(self, text: str) -> int:
        """Tokens of ``text`` alone, without special tokens."""
        return len(tokenize_documents(self.tokenizer, [text])[0]) if text else 0

    def make_item(
        self,
        task: str,
        context: str,
        question: str,
        answers: tuple[str, ...],
        asked_at: int,
        target_len: int,
        max_new_tokens: int | None = None,
    ) -> TaskItem:
        """The item, measured: ``asked_at`` is the character where the first asked needle starts."""
        length = len(self.tokenizer(context + question)["input_ids"])  # as LLM.encode counts, specials too
        depth = self.count(context[:asked_at]) / max(1, self.count(context))
        if max_new_tokens is None:
            max_new_tokens = self.count(" " + answers[0]) + _ANSWER_SLACK
        return TaskItem(task, context, question, answers, min(depth, 1.0), length, target_len, max_new_tokens)


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


def contains_whole(continuation: str, answer: str) -> bool:
    """``answer`` occurs in ``continuation`` not inside a longer run of letters and digits
    ("12345" is not found in "123456", "ABC" not in "XABC"). Case-sensitive."""
    if not answer:
        raise KvprError("an empty answer cannot be scored")
    return re.search(rf"(?<![^\W_]){re.escape(answer)}(?![^\W_])", continuation) is not None


def score_item(item: TaskItem, continuation: str) -> tuple[bool, float]:
    """(correct, recall). Single-answer tasks: ``score_answer`` on the one answer, recall 0 or 1.
    Multi-answer tasks: each answer found anywhere as a whole word or number; correct when all are."""
    if item.task not in MULTI_ANSWER_TASKS:
        correct = score_answer(continuation, item.answers[0])
        return correct, float(correct)
    found = sum(contains_whole(continuation, answer) for answer in item.answers)
    return found == len(item.answers), found / len(item.answers)
