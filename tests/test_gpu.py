"""The same equality tests on a CUDA device in fp16 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model, make_llm
from kvpr.config import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# fp16 logits of the tiny models are O(10); kernels differ from transformers' in summation order.
FP16_ATOL = 5e-2
PATHS = [
    ("none", "off", True),
    ("cpu", "off", True),
    ("cpu", 0.5, True),
    ("cpu", 1.0, True),
    ("cpu", "auto", True),
    ("cpu", 0.5, False),
]
PROMPTS = [[5, 17, 33, 2, 90, 11], [7, 7, 61], [100, 3, 44, 21, 9, 8, 71, 12, 4]]


def gpu_llm(model, offload="none", recompute="off", overlap=True, dummy_weights=False):
    return make_llm(model, offload, recompute, overlap, device="cuda", dtype="float16", dummy_weights=dummy_weights)


@pytest.mark.parametrize("family", ["llama-gqa", "opt", "qwen2"])
@pytest.mark.parametrize("offload,recompute", [("none", "off"), ("cpu", 0.5), ("cpu", 1.0)])
def test_fp16_logits_against_hf(tiny_checkpoint, family: str, offload: str, recompute) -> None:
    hf = make_hf_model(family).to("cuda", torch.float16)
    llm = gpu_llm(tiny_checkpoint(family), offload, recompute)
    ids = torch.tensor([PROMPTS[2] + [5, 6, 7, 8, 9, 10, 11, 12]], device="cuda")
    prompt_len = len(PROMPTS[2])
    with torch.no_grad():
        expected = hf(input_ids=ids).logits.float()
    executor = llm.make_executor(1, ids.shape[1])
    mask = torch.ones_like(ids[:, :prompt_len], dtype=torch.bool)
    prefill = executor.prefill(ids[:, :prompt_len], mask, all_logits=True).float()
    assert (prefill - expected[:, :prompt_len]).abs().max().item() < FP16_ATOL
    for position in range(prompt_len, ids.shape[1]):
        logits = executor.decode(ids[:, position]).float()
        assert (logits - expected[:, position]).abs().max().item() < FP16_ATOL, position
    executor.finish()


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_fp16_greedy_tokens_equal_across_paths(tiny_checkpoint, family: str) -> None:
    params = SamplingParams(max_new_tokens=16, stop_on_eos=False)
    reference = [c.token_ids for c in gpu_llm(tiny_checkpoint(family)).generate(PROMPTS, params)]
    for offload, recompute, overlap in PATHS:
        llm = gpu_llm(tiny_checkpoint(family), offload, recompute, overlap)
        assert [c.token_ids for c in llm.generate(PROMPTS, params)] == reference, (offload, recompute, overlap)


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize(
    "offload,recompute,resident",
    [("none", "off", 0), ("cpu", "off", 100), ("cpu", 0.5, 0), ("cpu", 1.0, 4), ("cpu", "off", 0)],
)  # resident; every token resident; recompute and copied chunks; a GPU prefix; copies only
def test_cuda_graph_step_equals_the_eager_step(tiny_checkpoint, family: str, offload: str, recompute, resident) -> None:
    """Decode steps replayed as CUDA graphs give the eager steps' logits, step after step, on a
    left-padded batch (rows of 6, 3 and 9 prompt tokens): resident, and offloaded with the host
    tier's X and K,V chunks loaded inside the graph. The tail flushes every 4 steps (eager steps),
    so the host tier grows and new step shapes are captured, more than ``MAX_GRAPHS`` of them."""
    from conftest import make_config
    from kvpr.api import LLM
    from kvpr.runtime.generation import left_pad

    ids, valid = left_pad(PROMPTS, 0, torch.device("cuda"))  # [3, 9]
    runs = {}
    for graph in (True, False):
        config = make_config(
            tiny_checkpoint(family), offload, recompute, device="cuda", dtype="float16", gpu_resident=resident,
            cuda_graph=graph,
        )  # fmt: skip
        executor = LLM(config).make_executor(3, 9 + 24)
        assert (executor.graphs is not None) == graph
        logits = [executor.prefill(ids, valid)[:, -1].float()]
        for _ in range(24):
            logits.append(executor.decode(logits[-1].argmax(-1)).float())
        executor.finish()
        runs[graph] = torch.stack(logits)
        if graph:
            shapes = list(executor.graphs.captured)
            assert shapes, "no step was captured"
            if offload == "cpu" and resident < 100:
                assert max(executor.host_lens) > 0 and max(shape.host_len for shape in shapes) > 0
    torch.testing.assert_close(runs[True], runs[False], atol=FP16_ATOL / 5, rtol=0)
    assert torch.equal(runs[True].argmax(-1), runs[False].argmax(-1))


def test_offloaded_storage_is_pinned_exactly() -> None:
    llm = gpu_llm("opt-125m", "cpu", 0.5, dummy_weights=True)
    executor = llm.make_executor(3, 100)
    assert executor.storage.is_pinned
    shape = executor.storage.shape
    assert executor.storage.nbytes == shape.kv_bytes() + shape.x_bytes()


def test_dummy_opt_overlapped_matches_sequential() -> None:
    """A real-size layer stack: the overlapped executor's logits equal the oracle's (fp16 tolerance)."""
    prompts = torch.randint(0, 50000, (4, 64), generator=torch.Generator().manual_seed(0)).tolist()
    outputs = []
    for overlap in (True, False):
        llm = gpu_llm("opt-125m", "cpu", 0.5, overlap=overlap, dummy_weights=True)
        executor = llm.make_executor(4, 80)
        ids = torch.tensor(prompts, device="cuda")
        executor.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
        steps = [executor.decode(ids[:, step]).float() for step in range(8)]
        executor.finish()
        outputs.append(torch.stack(steps))
    assert (outputs[0] - outputs[1]).abs().max().item() < 1e-2


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_compressed_tier_overlapped_matches_sequential(tiny_checkpoint, codec: str) -> None:
    from kvpr.api import LLM
    from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig

    outputs = []
    for overlap in (True, False):
        llm = LLM(
            EngineConfig(
                model=str(tiny_checkpoint("opt")),
                cache=CacheConfig(offload=Offload.CPU, recompute=0.5, kv_codec=codec),
                runtime=RuntimeConfig(device="cuda", dtype="float16", overlap=overlap, num_chunks=3),
            )
        )
        params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
        outputs.append([c.token_ids for c in llm.generate(PROMPTS, params)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize("x_codec", ["int8", "int4"])
def test_encoded_x_overlapped_matches_sequential(tiny_checkpoint, family: str, x_codec: str) -> None:
    """X codes copied in chunks on the copy stream and decoded right before each chunk's recompute
    give the sequential oracle's tokens."""
    from kvpr.api import LLM
    from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig

    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    outputs = []
    for overlap in (True, False):
        llm = LLM(
            EngineConfig(
                model=str(tiny_checkpoint(family)),
                cache=CacheConfig(offload=Offload.CPU, recompute=0.5, x_codec=x_codec),
                runtime=RuntimeConfig(device="cuda", dtype="float16", overlap=overlap, num_chunks=3),
            )
        )
        outputs.append([c.token_ids for c in llm.generate(PROMPTS, params)])
    assert outputs[0] == outputs[1]


def test_auto_residency_keeps_tokens_on_the_gpu(tiny_checkpoint) -> None:
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    reference = [c.token_ids for c in gpu_llm(tiny_checkpoint("opt")).generate(PROMPTS, params)]
    llm = make_llm(tiny_checkpoint("opt"), "cpu", "auto", device="cuda", dtype="float16", gpu_resident="auto")
    executor = llm.make_executor(3, 30)
    assert executor.offloaded and executor.plan.gpu_slots == 30  # a tiny model's whole cache fits
    assert [c.token_ids for c in llm.generate(PROMPTS, params)] == reference


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize(
    "percent,recompute", [("100 0 100 0 100 0", "off"), ("0 100 0 100 0 100", 0.5), ("30 30 30 30 30 30", 1.0)]
)
def test_throughput_mode_matches_latency_mode(tiny_checkpoint, tmp_path, family: str, percent: str, recompute) -> None:
    """The block schedule on CUDA streams (weights streamed per layer, cache on three tiers, X
    chunks recomputed as they land) gives the tokens of the GPU-resident latency run."""
    from kvpr.api import LLM
    from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig
    from kvpr.throughput_config import Placement, ThroughputConfig

    params = SamplingParams(max_new_tokens=16, stop_on_eos=False)
    reference = [c.token_ids for c in gpu_llm(tiny_checkpoint(family)).generate(PROMPTS, params)]
    llm = LLM(
        EngineConfig(
            model=str(tiny_checkpoint(family)),
            cache=CacheConfig(offload=Offload.CPU, recompute=recompute),
            runtime=RuntimeConfig(device="cuda", dtype="float16", num_chunks=3),
            throughput=ThroughputConfig(Placement.parse(percent.split()), 2, 2, offload_dir=str(tmp_path)),
        )
    )
    assert [c.token_ids for c in llm.generate(PROMPTS, params)] == reference


@pytest.mark.parametrize("codec", ["kvo", "kivi2", "kivi4"])
def test_compressed_cache_offloaded_equals_on_device(tiny_checkpoint, codec: str) -> None:
    """Packed rows in pinned host memory, gathered through staging and copied asynchronously, give
    the logits of the same rows on the device; at 8 bits without selection KVO decodes like fp16."""
    from conftest import teacher_forced, token_prompts
    from kvpr.api import LLM
    from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig

    def llm(offload: str, kv_codec: str, params: tuple = ()) -> LLM:
        cache = CacheConfig(offload=Offload(offload), kv_codec=kv_codec, kv_codec_params=params)
        runtime = RuntimeConfig(device="cuda", dtype="float16")
        return LLM(EngineConfig(model=str(tiny_checkpoint("llama-d32")), cache=cache, runtime=runtime))

    params = {"kvo": (("top_chunks", 4),), "kivi2": (), "kivi4": (("rotate", "kv"),)}[codec]  # kivi4: fused un-rotation
    ids = torch.tensor(token_prompts([340, 340], seed=1), device="cuda")
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :128] = False
    on_device, _ = teacher_forced(llm("none", codec, params), ids, valid, 300)
    offloaded, executor = teacher_forced(llm("cpu", codec, params), ids, valid, 300)
    executor.finish()
    assert torch.equal(on_device, offloaded) and executor.step_bytes()[1] > 0
    if codec == "kvo":
        assert all(cache.k_rows.rows.is_pinned() for cache in executor.caches[2:])
        assert all(cache.k_rows.zero_copy and cache.v_rows.zero_copy for cache in executor.caches[2:])
        eight_bit = (("top_chunks", 10**6), ("k_diff_bits", 8), ("k_keep", 32), ("v_bits", 8), ("v_anchor_bits", 8))
        sampling = SamplingParams(max_new_tokens=12, stop_on_eos=False)
        prompts = token_prompts([300, 172, 44], seed=2)
        reference = [c.token_ids for c in llm("none", "none").generate(prompts, sampling)]
        kvo = llm("cpu", "kvo", (*eight_bit, ("v_keep", 32)))
        assert [c.token_ids for c in kvo.generate(prompts, sampling)] == reference


def test_compiled_kvo_decode_equals_eager(tiny_checkpoint) -> None:
    """--compile: torch.compile's fused decode of the selected chunks gives the eager logits, offloaded."""
    from conftest import teacher_forced, token_prompts
    from kvpr.api import LLM
    from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig

    cache = CacheConfig(offload=Offload.CPU, kv_codec="kvo", kv_codec_params=(("top_chunks", 4),))
    ids = torch.tensor(token_prompts([340, 340], seed=1), device="cuda")
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :128] = False
    logits = []
    for compile in (False, True):
        runtime = RuntimeConfig(device="cuda", dtype="float16", compile=compile)
        llm = LLM(EngineConfig(model=str(tiny_checkpoint("llama-d32")), cache=cache, runtime=runtime))
        out, executor = teacher_forced(llm, ids, valid, 300)
        executor.finish()
        logits.append(out.float())
    assert (logits[0] - logits[1]).abs().max().item() < FP16_ATOL


def test_zero_copy_gather_reads_pinned_rows_in_place() -> None:
    """The gather kernel loads the selected rows straight from pinned host memory: the same bytes
    as staging them on the host, with no host wait (the index never leaves the device)."""
    from kvpr.cache.rows import GatherStaging, RowTier

    device = torch.device("cuda")
    for row_bytes in (1600, 70, 7):  # loaded as int32, int16 and uint8 words
        tier = RowTier(40, (3, 2), row_bytes, device, on_host=True, pin=True, staging=GatherStaging(True), name="t")
        rows = torch.randint(0, 256, (40, 3, 2, row_bytes), dtype=torch.uint8, device=device)
        tier.write(rows)
        index = torch.randint(0, 40 * 6, (777,), device=device)
        assert tier.zero_copy
        in_place, link = tier.gather(index)
        assert tier.zero_copy and link == 777 * row_bytes  # the kernel ran (no fallback)
        staged, _ = tier.gather(index.cpu())
        assert torch.equal(in_place, staged) and torch.equal(in_place, rows.view(-1, row_bytes)[index])


def test_profile_times_the_host_issue_per_x_codec() -> None:
    """The host's cost of issuing a layer and an X chunk, timed on the executor at batch 1 (where the
    host is the bottleneck): a layer costs tens of microseconds to milliseconds, a chunk less than a
    millisecond, and some chunk costs something."""
    from kvpr.models.registry import builtin_config
    from kvpr.scheduler.profiler import _measure_host_issue
    from kvpr.scheduler.profiler_timing import Progress

    layer_s, chunk_s, kv_chunk_s = _measure_host_issue(
        torch.device("cuda"), builtin_config("smollm2-135m"), torch.float16, Progress(False)
    )
    assert set(layer_s) == set(chunk_s) == {"none", "int8", "int4"}
    assert all(1e-5 < t < 5e-3 for t in layer_s.values()), layer_s
    assert all(0.0 <= t < 1e-3 for t in chunk_s.values()) and max(chunk_s.values()) > 0, chunk_s
    assert 0.0 < kv_chunk_s < 1e-3, kv_chunk_s  # a K,V chunk: copy, events, a piece kernel


def test_profile_times_the_kv_codec_decode() -> None:
    """The int8/int4 K,V decode is timed per stored byte: positive rates that grow with the block
    (launch costs amortised) and a load curve below the copy's alone."""
    from dataclasses import replace

    from kvpr.models.registry import builtin_config
    from kvpr.scheduler.profiler import _measure_kv_decode
    from kvpr.scheduler.profiler_timing import Progress, measurement_ladder, timer

    model = builtin_config("smollm2-135m")
    ladder = replace(measurement_ladder(torch.device("cuda"), model, torch.float16, 2), phase_budget_s=5.0)
    clock = timer(torch.device("cuda"), 0.01)
    curves = _measure_kv_decode(torch.device("cuda"), model, torch.float16, ladder, clock, Progress(False))
    assert set(curves) == {"int8", "int4"}
    for points in curves.values():
        rates = [rate for _, rate in points]
        assert all(1e5 < rate < 1e13 for rate in rates), points  # 16 rows of 192 elements: launch-bound
        assert rates[-1] > 10 * rates[0], points


# ------------------------------------------------------ KIVI codecs: the fused Triton decode (issue 14)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rotate", ["none", "k", "v", "kv"])
@pytest.mark.parametrize("d", [64, 128])
def test_kivi_fused_decode_matches_the_torch_oracle(bits: int, rotate: str, d: int) -> None:
    """On CUDA ``KiviCodec.decode`` is the Triton kernel (unpack, dequantise, inverse Hadamard, cast);
    ``decode_reference`` is the torch oracle. Same codes: float32 within summation-order noise, fp16
    and bf16 within one rounding of the output."""
    from kvpr.cache.codec import make_codec
    from kvpr.compress.kivi_triton import triton_available

    assert triton_available()
    codec = make_codec(f"kivi{bits}", rotate=rotate, group_size=32, token_group=32)
    gen = torch.Generator(device="cuda").manual_seed(bits)
    t, b, n = 75, 3, 2  # two whole token groups and an fp16 residual of 11
    k = torch.randn(t, b, n, d, device="cuda", generator=gen) * (1 + 4 * torch.rand(d, device="cuda", generator=gen))
    v = torch.randn(t, b, n, d, device="cuda", generator=gen)
    enc = codec.encode(k.half(), v.half())
    for dtype, atol in ((torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        fused = codec.decode(enc, dtype)
        oracle = codec.decode_reference(enc, dtype)
        for got, want in zip(fused, oracle, strict=True):
            assert got.dtype == dtype and got.shape == (t, b, n, d)
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-2)


def test_kivi_fused_decode_of_host_rows_moved_to_the_device() -> None:
    """A block encoded on the CPU (the host tier's side), pinned and copied: the kernel decodes it to
    what the CPU decode gives."""
    from kvpr.cache.codec import make_codec

    codec = make_codec("kivi3", rotate="kv", group_size=64, token_group=64)
    k, v = torch.randn(200, 2, 4, 128), torch.randn(200, 2, 4, 128)
    enc = codec.encode(k, v)
    on_gpu = enc.pin_memory().to("cuda", non_blocking=True)
    for got, want in zip(codec.decode(on_gpu, torch.float32), codec.decode(enc, torch.float32), strict=True):
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


# -- tiered attention: the GPU tier attended in place, host chunks as pieces -------------------------


@pytest.mark.parametrize("n_kv,group,t", [(8, 1, 37), (2, 4, 1000), (4, 8, 4100)])
def test_triton_piece_attention_matches_the_torch_oracle(n_kv: int, group: int, t: int) -> None:
    """The fused split-K kernel reads token-major K,V views in place (strided, masked) and gives the
    float32 oracle's partials within fp16 rounding; merged, they equal SDPA over the whole cache."""
    from kvpr.runtime.split_attention import Partials, _attend_torch, _attend_triton, merge_partials

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, d = 3, 128
    q = torch.randn(b, n_kv * group, d, device="cuda", dtype=torch.float16, generator=gen)
    tier = torch.randn(2, t + 16, b, n_kv, d, device="cuda", dtype=torch.float16, generator=gen)
    k, v = tier[0, 5 : 5 + t], tier[1, 5 : 5 + t]  # views with a token stride over the whole tier
    valid = torch.rand(b, t + 16, device="cuda", generator=gen) > 0.2
    mask = valid[:, 5 : 5 + t]
    fused = Partials()
    _attend_triton(q, k, v, mask, fused)
    ref_out, ref_lse = _attend_torch(q, k, v, mask)
    want = merge_partials(ref_out, ref_lse).reshape(b, 1, -1)  # [b, 1, n_q * d], as merge gives it
    torch.testing.assert_close(fused.merge(torch.float32), want, atol=2e-3, rtol=2e-3)
    assert fused.count >= (2 if t > 1000 else 1)  # long pieces are split over programs


@pytest.mark.parametrize("n_kv,group,t", [(32, 1, 2033), (8, 4, 8193), (8, 4, 3)])
def test_resident_decode_attention_equals_sdpa(n_kv: int, group: int, t: int) -> None:
    """The resident-only decode step's split-KV attention (``attend_resident``, what ``--offload none``
    and a fully resident tier run on CUDA) equals ``attend``'s SDPA over the same cache and mask."""
    from kvpr.models.common import attend, attention_bias
    from kvpr.runtime.split_attention import Partials, attend_resident, fused_decode

    assert fused_decode(torch.device("cuda"), torch.float16) and not fused_decode(torch.device("cuda"), torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(2)
    b, d = 4, 128
    q = torch.randn(b, n_kv * group, 1, d, device="cuda", dtype=torch.float16, generator=gen)
    k = torch.randn(t, b, n_kv, d, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn(t, b, n_kv, d, device="cuda", dtype=torch.float16, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool, device="cuda")
    valid[1, : t // 2] = False  # a left-padded row
    got = attend_resident(q, k, v, valid, Partials())
    want = attend(q, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attention_bias(valid[:, None, None, :], q.dtype))
    assert got.shape == want.shape == (b, 1, n_kv * group * d) and got.dtype == torch.float16
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_merge_equals_the_torch_merge(dtype: torch.dtype) -> None:
    """The one-launch merge over P partials (a -inf one among them: a piece a row does not attend)
    equals the torch merge, cast to the output dtype; pieces grow the reused buffers past their
    first capacity and keep the rows so far."""
    from kvpr.runtime.split_attention import Partials, merge_partials

    gen = torch.Generator(device="cuda").manual_seed(1)
    b, n_q, d, count = 5, 12, 128, 19
    out = torch.randn(count, b, n_q, d, device="cuda", generator=gen)
    lse = 4 * torch.randn(count, b, n_q, device="cuda", generator=gen)
    lse[3, 1] = float("-inf")
    partials = Partials()
    for first in range(0, count, 3):  # several pieces of up to 3 partials each: 8 rows first, then growth
        partials.add(out[first : first + 3], lse[first : first + 3])
    assert partials.count == count
    want = merge_partials(out, lse).to(dtype).reshape(b, 1, n_q * d)
    torch.testing.assert_close(partials.merge(dtype), want, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=2e-3)


def tiered_llm(model, overlap=True, recompute=0.5, resident=6):
    return make_llm(
        model, "cpu", recompute, overlap, device="cuda", dtype="float16", gpu_resident=resident, flush_block=4
    )


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize("resident", [0, 6, 100])
def test_tiered_cache_on_cuda_gives_the_resident_tokens(tiny_checkpoint, family: str, resident: int) -> None:
    """GPU prefix, host tier (recomputed and copied chunks on streams, the Triton pieces) and a tail
    flushed in blocks of 4: the resident cache's greedy tokens, overlapped and sequential alike."""
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    reference = [c.token_ids for c in gpu_llm(tiny_checkpoint(family)).generate(PROMPTS, params)]
    for overlap in (True, False):
        llm = tiered_llm(tiny_checkpoint(family), overlap, resident=resident)
        assert [c.token_ids for c in llm.generate(PROMPTS, params)] == reference, overlap
        if resident < 9:
            assert max(llm.last_stats.host_lens) > 0


def test_offload_auto_under_a_small_gpu_budget_tiers_the_cache() -> None:
    """--gpu-memory-gib caps the GPU tier: a budget just above the weights keeps part of a long
    batch's cache on the GPU and sends the rest to the host; a large budget keeps all of it."""
    from kvpr.api import LLM
    from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig

    def executor(gib: float):
        llm = LLM(
            EngineConfig(
                model="opt-125m",
                dummy_weights=True,
                cache=CacheConfig(offload=Offload.AUTO, recompute="auto", gpu_resident="auto"),
                runtime=RuntimeConfig(device="cuda", dtype="float16", gpu_memory_gib=gib),
            )
        )
        return llm.make_executor(256, 2048)  # fp16 K,V: 256 * 2048 * 12 layers * 2 * 768 * 2 B = 19.3 GB

    tiered = executor(8.0)
    assert tiered.offloaded and 0 < tiered.plan.gpu_slots < 2048 and tiered.plan.host_slots > 0
    assert not executor(60.0).offloaded


def test_offload_auto_plans_the_same_tiers_run_after_run() -> None:
    """A second generate under --offload auto gets the first one's GPU tier: the first run's tier
    (read by its tail flushes on the store stream) no longer counts as held once the run is over.
    Before the allocator's stream events were settled, the second run put its whole cache on the host."""
    from kvpr.api import LLM
    from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig, SamplingParams

    def llm_under(gib: float) -> LLM:
        return LLM(
            EngineConfig(
                model="opt-125m",
                dummy_weights=True,
                cache=CacheConfig(offload=Offload.AUTO, gpu_resident="auto"),
                runtime=RuntimeConfig(device="cuda", dtype="float16", gpu_memory_gib=gib),
            )
        )

    batch, prompt_len, gen_len = 64, 1024, 80  # 80 > the 64-token tail: every run flushes it to the host
    held = torch.cuda.memory_allocated() / 2**30
    budgets = [held + 1.9 + step / 10 for step in range(30)]  # weights, rings and reserve, then part of the cache

    def tiers_part(candidate: LLM) -> bool:
        executor = candidate.make_executor(batch, prompt_len + gen_len)
        return executor.offloaded and 0 < executor.plan.prefix_cap

    llm = next((candidate for candidate in map(llm_under, budgets) if tiers_part(candidate)), None)
    assert llm is not None, "no budget in the sweep tiers the cache"
    prompts = torch.randint(0, 1000, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=gen_len, stop_on_eos=False)
    # the first run also leaves what a process keeps once (the CUDA-graph capture stream's cuBLAS
    # workspace), so the runs compared are the second and the third
    runs = []
    for _ in range(3):
        held = torch.cuda.memory_allocated()
        tokens = [c.token_ids for c in llm.generate(prompts, params)]
        runs.append((held, llm.last_stats.host_lens, tokens))
    (_, first, _), (held_2, second, second_tokens), (held_3, third, third_tokens) = runs
    assert first[0] > 0 and second == third, (
        f"held before runs 2, 3: {held_2}, {held_3} B; host {second[0]}, {third[0]}"
    )
    assert third_tokens == second_tokens  # the same placement gives the same tokens (fp16: another may not)
