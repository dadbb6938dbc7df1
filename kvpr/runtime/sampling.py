"""Next-token choice: greedy, or temperature + nucleus (top-p) sampling from a seeded generator."""

from __future__ import annotations

import torch

from kvpr.config import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [b, V] -> token ids [b]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [b, V]
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # [b, 1]
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor,
    rows: list[int],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Next token of each row in ``rows`` from logits [b, V], each under its own params and generator.

    A sampled row draws alone from its own generator, exactly as ``sample_next`` draws for a batch of
    one, so a seeded request gives the same tokens in any batch. Greedy rows share one argmax.
    """
    chosen = dict(zip(rows, logits[rows].argmax(dim=-1).tolist())) if rows else {}
    for row, row_params, generator in zip(rows, params, generators):
        if row_params.temperature != 0:
            chosen[row] = int(sample_next(logits[row : row + 1], row_params, generator).item())
    return [chosen[row] for row in rows]
