"""RULER's harder synthetic families (Hsieh et al. 2024), rebuilt on the offline essays: each is a
function of a ``TaskBuilder`` (its filler, guard and measuring) returning one seeded ``TaskItem``.

- ``multi_key``: many needles of one form whose keys are two-word and alike ("blue falcon",
  "blue tiger", "green falcon"), one asked (niah_multikey).
- ``multi_value``: one key with 4 values at different depths, all asked (niah_multivalue).
- ``variable_tracking``: a chain "VAR A = 12345." "VAR B = VAR A." ... of 4 variables and one
  distractor chain in filler; the answers are the chain's names (vt).
- ``common_words``: a numbered list where 10 words occur many times and the rest once or a few
  times; the answers are the 10 (cwe). The list fills the context outside the guard; essay filler
  fills the guard, so every item's depth is the list's start.

Measured on the default SmolLM2-135M uncompressed (fp32 CPU, greedy, the whole prompt prefilled,
10 items at 1024 tokens), items correct and mean recall with guard 0 / guard 256:

- multi_key 6/10 / 4/10 (8 needles).
- multi_value 3/10, recall 0.53 / 4/10, recall 0.62. "What are the 4 special magic numbers for
  X? The 4 special magic numbers for X are" (the count helps: 2/10 against 1/10 without it, 5 items
  earlier 2/5 against 0/5 for a bare "The special magic numbers for X are:").
- variable_tracking 0/10, recall 0.30 / 0/10, recall 0.28: the model names one or two of the
  chain (often the distractor's too), never all four; RULER's "Find all variables that are assigned
  the value N in the text above. Answer: ... they are:" gave 0/5, recall 0.10-0.35. Near zero on
  ``correct``; only recall separates methods here.
- common_words 0/10, recall 0.28 / 0/10, recall 0.07: at chance. Copying the list's first 10
  distinct words would score recall 0.41 at 1K (common words are half the entries); the RULER
  wording "Question: What are the 10 most common words in the list above? Answer: The top 10 words
  appearing most often in the list are:" scored recall 0.00 (the model answers "A) ..."), and with
  essay filler over the guard between list and question the model loses the list. Kept simple.
"""

from __future__ import annotations

import random
import re
import string
from typing import TYPE_CHECKING

from kvpr.errors import KvprError

if TYPE_CHECKING:
    from kvpr.eval.tasks import TaskBuilder, TaskItem

# Keys of the key-value needles: short, common, one word each, never a substring of another.
WORDS: tuple[str, ...] = tuple(
    "apple river candle falcon garden hammer island jacket kettle lemon mirror needle orange pepper "
    "rabbit saddle tiger violin window zebra anchor basket cactus dolphin engine forest guitar helmet "
    "igloo jungle ladder magnet napkin oyster parrot quartz rocket sponge tunnel walrus".split()
)
COLOURS: tuple[str, ...] = tuple("red blue green black white brown silver golden purple pink grey yellow".split())
KV_HEADER = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n\n"
)
VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
CWE_HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
NUM_VALUES = 4  # multi_value: values of the one key
NUM_CHAIN_VARS = 4  # variable_tracking: variables of the asked chain (3 hops after the first value)
NUM_COMMON = 10  # common_words: words asked
_SEAM = 4  # tokens kept beyond the guard where re-tokenising may shift a token


def _numbers(rng: random.Random, count: int, digits: int = 7) -> list[str]:
    return [str(n) for n in rng.sample(range(10 ** (digits - 1), 10**digits), count)]


def multi_key(builder: TaskBuilder, target_len: int, fraction: float, seed: int) -> TaskItem:
    """4-16 needles (one per 128 tokens) keyed by alike colour-noun pairs; one key asked."""
    rng = random.Random(seed)
    num_needles = min(16, max(4, target_len // 128))
    colours = rng.sample(COLOURS, max(2, num_needles // 4))
    nouns = rng.sample(WORDS, num_needles // len(colours) + 1)
    keys = rng.sample([f"{colour} {noun}" for colour in colours for noun in nouns], num_needles)
    numbers = _numbers(rng, num_needles)
    needles = [f"The special magic number for {k} is {n}." for k, n in zip(keys, numbers)]
    placed = [(fraction, needles[0])] + [(rng.random(), needle) for needle in needles[1:]]
    question = f"\n\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is"
    return builder.in_filler("multi_key", KV_HEADER, placed, question, (numbers[0],), target_len, rng)


def multi_value(builder: TaskBuilder, target_len: int, fraction: float, seed: int) -> TaskItem:
    """One key's 4 values: the first at ``fraction``, the others at random depths after it."""
    rng = random.Random(seed)
    key = rng.choice(WORDS)
    values = _numbers(rng, NUM_VALUES)
    fractions = [fraction] + sorted(fraction + (1.0 - fraction) * rng.random() for _ in values[1:])
    placed = [(f, f"One of the special magic numbers for {key} is: {v}.") for f, v in zip(fractions, values)]
    question = (
        f"\n\nWhat are the {NUM_VALUES} special magic numbers for {key}? "
        f"The {NUM_VALUES} special magic numbers for {key} are"
    )
    budget = list_budget(builder, values)
    return builder.in_filler("multi_value", KV_HEADER, placed, question, tuple(values), target_len, rng, budget)


def variable_tracking(builder: TaskBuilder, target_len: int, fraction: float, seed: int) -> TaskItem:
    """A 4-variable chain from a 5-digit value (its first statement at ``fraction``, the rest in
    order after it) and a distractor chain of another value anywhere."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < 2 * NUM_CHAIN_VARS:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    values = _numbers(rng, 2, digits=5)
    chains = [names[:NUM_CHAIN_VARS], names[NUM_CHAIN_VARS:]]
    asked = sorted(fraction + (1.0 - fraction) * rng.random() for _ in range(NUM_CHAIN_VARS - 1))
    spread = [[fraction, *asked], sorted(rng.random() for _ in range(NUM_CHAIN_VARS))]
    placed: list[tuple[float, str]] = []
    for chain, value, fractions in zip(chains, values, spread):
        sources = [value] + [f"VAR {name}" for name in chain[:-1]]
        placed += [(f, f"VAR {name} = {source}.") for f, name, source in zip(fractions, chain, sources)]
    question = (
        f"\n\nQuestion: Which variables are assigned the value {values[0]}, directly or through other "
        f"variables? Answer: The variables assigned the value {values[0]} are VAR"
    )
    budget = list_budget(builder, [f"VAR {name}" for name in chains[0]])
    return builder.in_filler(
        "variable_tracking", VT_HEADER, placed, question, tuple(chains[0]), target_len, rng, budget
    )


def common_words(builder: TaskBuilder, target_len: int, fraction: float, seed: int) -> TaskItem:
    """A numbered list filling the context outside the guard: 10 words ``common`` times each (3-30,
    scaled to the length), the others ``max(1, common // 10)`` times; then essay filler to length.
    ``fraction`` is unused: the list starts right after the header."""
    rng = random.Random(seed)
    question = f"\n\nThe {NUM_COMMON} words that appear most often in the list above are:"
    head = builder.count(CWE_HEADER) + builder.count(question)
    room = target_len - head - builder.guard_tokens - 8  # list tokens: 8 spare for the seams
    num_entries, used = 0, 0
    while used + len(str(num_entries + 1)) + 3 <= room:  # "123. word " is digits + 3 tokens
        num_entries += 1
        used += len(str(num_entries)) + 3
    common = min(30, max(3, num_entries // 20))
    rare = max(1, common // 10)
    if num_entries < NUM_COMMON * (common + 1):
        shortest = sum(len(str(number)) + 3 for number in range(1, NUM_COMMON * 4 + 1))  # 3x common, 10 once
        raise KvprError(
            f"common_words at {target_len} tokens has no room for its list beside guard_tokens="
            f"{builder.guard_tokens}: use a context of at least {target_len - room + shortest} tokens"
        )
    start = builder.filler_start(rng, target_len)
    nearby = set(re.findall(r"[a-z]+", builder.filler_text(start, builder.guard_tokens + 256).lower()))
    pool = [word for word in builder.word_pool() if word not in nearby]
    words = rng.sample(pool, min(len(pool), NUM_COMMON + num_entries))
    chosen, others = words[:NUM_COMMON], words[NUM_COMMON:]
    entries = chosen * common + others[: max(0, (num_entries - NUM_COMMON * common) // rare)] * rare
    rng.shuffle(entries)
    listed = _numbered(entries)
    while builder.count(CWE_HEADER + listed + question) > target_len - builder.guard_tokens - _SEAM:
        del entries[max(n for n, word in enumerate(entries) if word not in chosen)]  # a rare entry
        listed = _numbered(entries)
    body = CWE_HEADER + listed + "\n\n"
    fill = target_len - builder.count(body) - builder.count(question)
    item: TaskItem | None = None
    for _attempt in range(4):  # re-size the filler until the prompt measures within tolerance
        context = body + builder.filler_text(start, max(0, fill)).lstrip()
        item = builder.make_item(
            "common_words", context, question, tuple(chosen), len(CWE_HEADER), target_len, list_budget(builder, chosen)
        )
        if abs(item.length - target_len) <= 2:
            break
        fill += target_len - item.length
    assert item is not None
    return item


def _numbered(words: list[str]) -> str:
    return " ".join(f"{number}. {word}" for number, word in enumerate(words, 1))


def list_budget(builder: TaskBuilder, answers: list[str]) -> int:
    """Answer tokens to list ``answers`` numbered, one a line (the longest form the model tends to
    use; SmolLM2 spends a token per digit), and a few spare."""
    return builder.count("\n" + "\n".join(f"{number}. {answer}" for number, answer in enumerate(answers, 1))) + 4
