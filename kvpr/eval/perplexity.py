"""Perplexity over fixed, seeded windows of the Paul Graham essays, measured through ``LLM.score``.

Each window of ``context_len`` tokens is prefilled for its first ``prefix_len`` tokens and the rest
is teacher-forced one decode step at a time, so placement, the recomputation split and any KV codec
shape the figure exactly as they shape generation. The token right after the prefix is not scored:
its logit comes from the prefill, which attends over the uncompressed prefix. Not wikitext-2 or
PG-19: not comparable with papers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from kvpr.errors import KvprError
from kvpr.eval.corpus import ESSAYS, paul_graham_essays, tokenize_documents
from kvpr.eval.stats import bootstrap_ppl_interval

if TYPE_CHECKING:
    from kvpr.api import LLM

DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class PerplexityResult:
    """exp of the mean negative log-likelihood over ``num_tokens`` scored tokens, with a bootstrap
    95% interval over the windows (``window_nll``: each window's summed negative log-likelihood)."""

    ppl: float
    ppl_ci: tuple[float, float]
    window_nll: tuple[float, ...]
    num_tokens: int
    context_len: int
    prefix_len: int
    num_windows: int
    seed: int
    corpus: str = f"{ESSAYS.package}=={ESSAYS.version} {ESSAYS.files}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def essay_token_stream(tokenizer: Any) -> list[int]:
    """All essays in file-name order, tokenized one by one, joined by the tokens of a blank line."""
    documents = paul_graham_essays()
    separator = tokenize_documents(tokenizer, [DOCUMENT_SEPARATOR])[0]
    stream: list[int] = []
    for ids in tokenize_documents(tokenizer, [doc.text for doc in documents]):
        if stream:
            stream.extend(separator)
        stream.extend(ids)
    return stream


def select_windows(stream_len: int, context_len: int, num_windows: int, seed: int) -> list[int]:
    """Start offsets of ``num_windows`` distinct, non-overlapping, aligned windows, seeded and sorted."""
    if context_len < 2 or num_windows < 1:
        raise KvprError(f"context_len={context_len} and num_windows={num_windows}: need >= 2 and >= 1")
    num_slots = stream_len // context_len
    if num_slots < num_windows:
        raise KvprError(
            f"the essays hold {num_slots} windows of {context_len} tokens, fewer than the {num_windows} "
            "asked for: lower --num-windows or the context length"
        )
    slots = random.Random(seed).sample(range(num_slots), num_windows)
    return sorted(slot * context_len for slot in slots)


def perplexity(
    llm: LLM,
    context_len: int,
    num_windows: int = 4,
    prefix_len: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    stream: Sequence[int] | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``llm`` (under its current placement) on seeded essay windows.

    Args:
        context_len: tokens per window (prefix + scored part).
        prefix_len: tokens prefilled and not scored; default ``context_len // 2`` so that every
            scored token attends to at least half a window of cached K,V.
        batch_size: windows per ``LLM.score`` call.
        stream: the essay token stream, if the caller already made it (see ``essay_token_stream``).
    """
    prefix_len = context_len // 2 if prefix_len is None else prefix_len
    if not 0 < prefix_len < context_len - 1:
        raise KvprError(f"prefix_len={prefix_len} must lie in [1, {context_len - 2}]: at least one token is scored")
    if batch_size < 1:
        raise KvprError(f"batch_size={batch_size}: must be >= 1")
    if stream is None:
        if llm.tokenizer is None:
            raise KvprError(f"model {llm.name} has no tokenizer: perplexity needs one to read the essays")
        stream = essay_token_stream(llm.tokenizer)
    starts = select_windows(len(stream), context_len, num_windows, seed)
    windows = [list(stream[start : start + context_len]) for start in starts]
    window_nll: list[float] = []
    batches = range(0, len(windows), batch_size)
    for first in tqdm(batches, desc=f"ppl@{context_len}", disable=not progress, leave=False):
        logprobs = llm.score(windows[first : first + batch_size], prefix_len)  # [b, context_len - prefix_len]
        decoded = logprobs[:, 1:].double()  # column 0 came from the prefill's logits: not scored
        window_nll += (-decoded.sum(dim=1)).tolist()
    per_window = context_len - prefix_len - 1
    num_tokens = per_window * len(windows)
    return PerplexityResult(
        ppl=math.exp(sum(window_nll) / num_tokens),
        ppl_ci=bootstrap_ppl_interval(window_nll, [per_window] * len(windows), seed=seed),
        window_nll=tuple(window_nll),
        num_tokens=num_tokens,
        context_len=context_len,
        prefix_len=prefix_len,
        num_windows=num_windows,
        seed=seed,
    )
