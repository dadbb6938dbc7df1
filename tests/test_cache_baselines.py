"""H2O, StreamingLLM and Quest as cache methods: exact where nothing is dropped, and the right tokens kept."""

from __future__ import annotations

import pytest
import torch

from conftest import method_llm as engine
from conftest import teacher_forced, token_prompts
from kvpr.cache.storage import CacheShape
from kvpr.compress.methods import H2OConfig, QuestConfig, StreamingConfig
from kvpr.config import SamplingParams
from kvpr.errors import KvprError
from kvpr.models.loader import resolve_source
from kvpr.runtime.budget_caches import H2OCache, QuestCache, StreamingCache
from kvpr.runtime.compressed import CacheMethod

CPU = torch.device("cpu")


def padded_ids(lengths: list[int], total: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows left-padded to a common prompt width, then ``total - width`` teacher-forced tokens."""
    width = max(lengths)
    rows = token_prompts([total] * len(lengths), seed)
    valid = torch.ones(len(lengths), total, dtype=torch.bool)
    for row, length in enumerate(lengths):
        valid[row, : width - length] = False
    return torch.tensor(rows), valid, width


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize(
    "codec, params, exact",
    [
        ("streaming", (("budget", 256), ("sink", 4)), False),  # the window covers the context
        ("quest", (("budget", 256), ("page_size", 16)), True),  # every page selected: the dense path
        ("h2o", (("budget", 256), ("recent", 32)), False),  # nothing to evict
    ],
)
def test_budget_covering_the_context_equals_fp16(tiny_checkpoint, family: str, codec: str, params, exact: bool) -> None:
    directory = tiny_checkpoint(family)
    ids, valid, width = padded_ids([60, 45, 23], 80, seed=1)
    expected, _ = teacher_forced(engine(directory), ids, valid, width)
    got, _ = teacher_forced(engine(directory, codec, params=params), ids, valid, width)
    if exact:
        assert torch.equal(got, expected)
    else:  # float32 softmax of the probabilities H2O needs, or a permuted slot order
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    prompts = token_prompts([40, 25, 9], seed=2)
    sampling = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    reference = [c.token_ids for c in engine(directory).generate(prompts, sampling)]
    assert [c.token_ids for c in engine(directory, codec, params=params).generate(prompts, sampling)] == reference


def test_small_budgets_change_the_output_and_read_less(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("llama-gqa")
    ids, valid, width = padded_ids([150, 120], 170, seed=3)
    expected, dense = teacher_forced(engine(directory), ids, valid, width)
    for codec, params in (
        ("streaming", (("budget", 32),)),
        ("quest", (("budget", 32), ("uncompressed_layers", 0))),
        ("h2o", (("budget", 32),)),
    ):
        got, executor = teacher_forced(engine(directory, codec, params=(*params, *_recent(codec))), ids, valid, width)
        assert (got - expected).abs().max() > 1e-3, codec
        assert executor.step_bytes()[0] < 0.5 * 2 * 170 * 2 * 2 * 16 * 4 * 3, codec  # < half of dense K,V reads


def _recent(codec: str) -> tuple:
    return (("recent", 8),) if codec == "h2o" else ()


def _shape(b: int, n: int, d: int, max_len: int) -> CacheShape:
    return CacheShape(1, max_len, b, n, d, n * d, torch.float32)


def test_h2o_never_evicts_the_newest_tokens_and_keeps_a_heavy_hitter() -> None:
    cfg = H2OConfig(budget=24, recent=8)
    cache = H2OCache(cfg, _shape(2, 2, 16, 200), CPU)
    gen = torch.Generator().manual_seed(4)
    q_dir = torch.randn(16, generator=gen)
    k = torch.randn(40, 2, 2, 16, generator=gen)
    k[5] = 6 * q_dir / q_dir.norm()  # token 5: every query attends to it
    valid = torch.ones(40, 2, dtype=torch.bool)
    valid[:3, 1] = False  # padding: evicted before anything real
    scores = torch.rand(40, 2, 2)
    scores[5] = 10.0
    cache.prefill(k, torch.randn_like(k), valid, scores)
    for step in range(40, 120):
        q = (q_dir + 0.3 * torch.randn(2, 4, 16, generator=gen)).reshape(2, 4, 16)
        cache.decode(q, torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16, generator=gen))
        held = [[set(cache.token[b, n][cache.valid[b, n]].tolist()) for n in range(2)] for b in range(2)]
        for row in held:
            for tokens in row:
                assert len(tokens) == cfg.budget
                assert set(range(step + 1 - cfg.recent, step + 1)) <= tokens  # the newest stay
                assert 5 in tokens  # the heavy hitter stays
    assert not ({0, 1, 2} & set(cache.token[1][cache.valid[1]].tolist()))


def test_streaming_keeps_the_sinks_and_the_newest_window() -> None:
    cfg = StreamingConfig(budget=12, sink=4)
    cache = StreamingCache(cfg, _shape(2, 1, 8, 100), CPU)
    count = 30
    token = torch.arange(count, dtype=torch.float32)[:, None, None, None].expand(count, 2, 1, 8).clone()
    valid = torch.ones(count, 2, dtype=torch.bool)
    valid[:10, 1] = False  # row 1 starts at slot 10
    cache.prefill(token, token.clone(), valid, None)
    for step in range(count, count + 15):
        new = torch.full((2, 1, 8), float(step))
        cache.decode(torch.randn(2, 1, 8), new, new)
        for row, first in ((0, 0), (1, 10)):
            held = set(cache.k[row, 0, :12][cache.valid[row, :12], 0].long().tolist())
            assert held == set(range(first, first + 4)) | set(range(step + 1 - cfg.window, step + 1))


def test_quest_reads_the_page_with_the_planted_key() -> None:
    cfg = QuestConfig(budget=32, page_size=8)  # the newest page + 3 others
    cache = QuestCache(cfg, _shape(1, 1, 16, 200), CPU)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 16, generator=gen)  # 2 query heads on one KV head
    k = 0.1 * torch.randn(120, 1, 1, 16, generator=gen)
    k[43] = 5 * q[0, 0] / q[0, 0].norm()  # page 5
    cache.prefill(k, torch.randn_like(k), torch.ones(120, 1, dtype=torch.bool), None)
    assert 5 in cache._select(q, 15, 3)[0, 0].tolist()
    cache.decode(q, torch.zeros(1, 1, 16), torch.zeros(1, 1, 16))
    assert cache.read_bytes < 0.5 * 2 * 121 * 16 * 4


def test_budget_bytes_and_placement_rules(tiny_checkpoint) -> None:
    model = resolve_source("opt-6.7b", dummy_weights=True).config
    fp16 = 2 * model.num_layers * model.kv_size * 2
    for name, cfg in (("h2o", H2OConfig()), ("streaming", StreamingConfig())):
        stored, read = CacheMethod(name, cfg, model).footprint(2048)
        assert stored == pytest.approx(fp16 * 512 / 2048) and read >= stored
    stored, read = CacheMethod("quest", QuestConfig(), model).footprint(2048)
    assert stored > fp16 and read < 0.4 * fp16  # keeps everything (+ min/max keys), reads the budget
    with pytest.raises(KvprError, match="below --h2o-budget"):
        H2OConfig(budget=8, recent=8)
    with pytest.raises(KvprError, match="at least one page"):
        QuestConfig(budget=8, page_size=16)
    with pytest.raises(KvprError, match="drop --offload cpu"):
        engine(tiny_checkpoint("opt"), "streaming", "cpu")
