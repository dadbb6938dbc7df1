"""How many host-side ops a decode step issues, counted on kvpr's own executors (and transformers'
model) run on the CPU with a tiny model of the same family: the op counts of the host-issue model
(host.py), so that no path's host time is guessed.

Every aten op the step dispatches that is not a view is counted once (``TorchDispatchMode``): the
host pays Python, dispatch and a kernel launch per op, whatever the tensor sizes; a view (an op that
only makes new metadata over its input: ``view``, ``slice``, ``select``, ``t``...) launches nothing
and is not counted (counting views as well was tried: the validation then has 24 rows within 15%,
against 27 without). The CPU run differs from the CUDA one in these places, each accounted for
here, explicitly:

- the split-K attention of a piece and the merge of the partials are one Triton launch each on CUDA
  (runtime/split_attention.py); on the CPU they run as float32 torch ops: each call counts as 1,
  and ``Partials.add``, the CPU's copy of a piece's partial into the rows the kernel writes on
  CUDA, as 0;
- the stream and event calls of ``StreamSet`` (record, wait, stream switches, keep-alives) are CUDA
  API calls on the host on CUDA and no-ops on the CPU: each call counts as 1;
- KVO's ``torch.compile`` of the selected chunks' decode (``--compile``) is not run on the CPU: its
  call counts as 1 (a lower bound: the compiled graph launches a few fused kernels); the selected
  rows are read as on CUDA, by the zero-copy branch, each part's gather one kernel (``kvo_layer_ops``);
- transformers' offloaded cache switches CUDA streams on every layer and cannot run on the CPU:
  its ops are not counted (``hf_layer_ops`` counts the GPU-resident ``DynamicCache`` only).

Only the op count depends on the path, not on the tensor sizes, so hidden sizes are shrunk; the
head layout (GQA group), the family's layer code, the plan's chunk counts and tiers are the row's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from kvpr.config import ModelConfig

STREAM_CALLS = (
    "record_on_copy",
    "record_on_compute",
    "record_on_store",
    "compute_waits",
    "copy_waits",
    "copy_waits_compute",
    "keep_alive_for_copy",
    "keep_alive_for_store",
    "on_copy",
    "on_store_after_compute",
)
TINY_HEAD_DIM = 64  # KVO needs whole 32-channel groups; the count does not depend on it


class OpCounter(TorchDispatchMode):
    """Counts the aten ops other than views dispatched while active; ``one_op(fn)`` wraps a function that is one
    kernel launch on CUDA so that its CPU ops count as 1 (``suspended`` while it runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.suspended = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.suspended and not func.is_view:  # a view only makes tensor metadata: no launch
            self.ops += 1
        return func(*args, **(kwargs or {}))

    def one_op(self, fn: Callable[..., Any], ops: int = 1) -> Callable[..., Any]:
        """``fn`` counted as ``ops`` ops whatever it dispatches (0: work the CPU path alone does)."""

        def counted(*args: Any, **kwargs: Any) -> Any:
            if not self.suspended:
                self.ops += ops
            self.suspended += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.suspended -= 1

        return counted


@contextlib.contextmanager
def counting(one_launch: Sequence[tuple[object, str]] = ()) -> Iterator[OpCounter]:
    """An active ``OpCounter`` with CUDA's one-launch kernels and stream calls counted as on CUDA;
    ``one_launch``: more (owner, attribute) callables to count as one op each."""
    from kvpr.runtime import split_attention
    from kvpr.runtime.split_attention import Partials
    from kvpr.runtime.streams import StreamSet

    counter = OpCounter()
    triton = [(split_attention, name) for name in ("_attend_torch", "merge_partials")]  # one launch each on CUDA
    streams = [(StreamSet, name) for name in STREAM_CALLS]  # one CUDA API call each, a no-op on the CPU
    with contextlib.ExitStack() as stack:
        for owner, name in [*triton, *streams, *one_launch]:
            stack.enter_context(mock.patch.object(owner, name, counter.one_op(getattr(owner, name))))
        # the CPU copies a piece's partial into the buffer; the Triton kernel writes its reserved rows
        stack.enter_context(mock.patch.object(split_attention.Partials, "add", counter.one_op(Partials.add, ops=0)))
        stack.enter_context(counter)
        yield counter


def count_ops(step: Callable[[], object], one_launch: Sequence[tuple[object, str]] = ()) -> int:
    """Host ops of one call of ``step``."""
    with counting(one_launch) as counter:
        step()
    return counter.ops


def tiny_config(model: ModelConfig, num_layers: int) -> ModelConfig:
    """``model``'s family and head layout at a small size: the same ops, cheaply."""
    group = model.num_q_heads // model.num_kv_heads
    n_kv = 2
    hidden = n_kv * group * TINY_HEAD_DIM
    proj = None if model.word_embed_proj_dim is None else hidden
    return replace(
        model, num_layers=num_layers, vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
        num_q_heads=n_kv * group, num_kv_heads=n_kv, head_dim=TINY_HEAD_DIM, word_embed_proj_dim=proj,
    )  # fmt: skip


@dataclass(frozen=True)
class TieredOps:
    """Host ops of the tiered executor (runtime/latency.py) for one family. A layer: with every token
    in the GPU tier, ``gpu_layer``; with a host tier, ``host_layer`` plus each X and K,V chunk. A step
    outside its layers (embedding, positions, logits, greedy sampling): ``gpu_step`` or ``host_step``,
    plus ``recompute_step`` when ``l > 0`` (the old positions' rotary tables, once a step)."""

    gpu_layer: int
    host_layer: int
    x_chunk: int
    kv_chunk: int
    gpu_step: int
    host_step: int
    recompute_step: int

    def step(self, num_layers: int, x_chunks: int, kv_chunks: int) -> int:
        """Ops of a step whose every layer has ``x_chunks`` X chunks and ``kv_chunks`` K,V chunks."""
        if not x_chunks and not kv_chunks:
            return self.gpu_step + num_layers * self.gpu_layer
        layer = self.host_layer + x_chunks * self.x_chunk + kv_chunks * self.kv_chunk
        return self.host_step + (self.recompute_step if x_chunks else 0) + num_layers * layer


def _tiered_decode_ops(
    model: ModelConfig, num_layers: int, host: bool, recompute: int = 0, chunks: int = 1, prompt: int = 32
) -> int:
    """Ops of one decode step (``sample_next`` included) of the tiered executor, batch 2, with the
    prompt on the host tier in 16-token slots (so ``prompt / 16`` chunks: X of ``[0, l)`` in
    ``chunks``, K,V of the rest) or in the GPU tier."""
    from kvpr.cache.storage import CacheShape, KVStorage
    from kvpr.config import SamplingParams
    from kvpr.models.loader import build_model, init_dummy_weights
    from kvpr.runtime.latency import OverlappedExecutor
    from kvpr.runtime.sampling import sample_next
    from kvpr.runtime.tiers import TierPlan
    from kvpr.scheduler.plan import StepSplit

    config, b, cpu = tiny_config(model, num_layers), 2, torch.device("cpu")
    built = build_model(config)
    init_dummy_weights(built, cpu, torch.float32, seed=0)
    shape = CacheShape.for_model(config, b, prompt + 4, torch.float32)
    storage = KVStorage(shape, cpu, pin=False, store_inputs=True)
    plan = TierPlan.for_capacity(0 if host else shape.max_len, shape.max_len)
    split = StepSplit(recompute, chunks) if recompute else StepSplit(0)
    run = OverlappedExecutor(built, storage, cpu, host, lambda _: split, plan, slot_tokens=16 if host else None)
    ids = torch.zeros(b, prompt, dtype=torch.long)
    run.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    run.decode(ids[:, 0])  # the first step settles lazily made buffers
    greedy = SamplingParams(temperature=0.0)
    return count_ops(lambda: sample_next(run.decode(ids[:, 0]), greedy, None))


def tiered_ops(model: ModelConfig) -> TieredOps:
    """``TieredOps`` of ``model``'s family, by differences of counted steps: 2 layers - 1 is a layer;
    a 48-token host tier - a 32-token one is a K,V chunk; 16 tokens recomputed in 2 X chunks - in 1
    is an X chunk; what recomputing adds beyond its chunk (the first X chunk in place of a K,V
    chunk) is once a step."""
    gpu1, gpu2 = (_tiered_decode_ops(model, n, False) for n in (1, 2))
    host1, host2 = (_tiered_decode_ops(model, n, True) for n in (1, 2))
    kv_chunk = _tiered_decode_ops(model, 1, True, prompt=48) - host1
    x1, x2 = (_tiered_decode_ops(model, 1, True, 16, c) for c in (1, 2))
    x_chunk = x2 - x1
    gpu_layer, host_layer = gpu2 - gpu1, host2 - host1 - 2 * kv_chunk
    return TieredOps(
        gpu_layer, host_layer, x_chunk, kv_chunk, gpu1 - gpu_layer, host1 - host_layer - 2 * kv_chunk,
        x1 - host1 - x_chunk + kv_chunk,
    )  # fmt: skip


def kvo_layer_ops(model: ModelConfig) -> tuple[int, int, int]:
    """(ops of one KVO layer, of one dense layer, of the step outside its layers) of the compressed
    executor with the rows in host memory and ``--compile``, at a context where chunk selection runs
    (more finalised chunks than ``top_chunks``)."""
    from kvpr.cache.storage import CacheShape
    from kvpr.compress.kvo_config import KVOConfig
    from kvpr.config import CacheConfig, Offload
    from kvpr.models.loader import build_model, init_dummy_weights
    from kvpr.runtime.compressed import CompressedExecutor, make_method

    kvo = KVOConfig()
    dense = kvo.uncompressed_layers
    b, prompt, cpu = 2, (kvo.top_chunks + 8) * kvo.chunk + 2 * kvo.window, torch.device("cpu")

    def step_ops(num_layers: int) -> int:
        from kvpr.runtime.kvo_cache import KVOCache

        config = tiny_config(model, num_layers)
        built = build_model(config)
        init_dummy_weights(built, cpu, torch.float32, seed=0)
        method = make_method(CacheConfig(kv_codec="kvo", offload=Offload.CPU), config)
        shape = CacheShape.for_model(config, b, prompt + 4, torch.float32)
        run = CompressedExecutor(built, method, shape, cpu, offloaded=True, pin=False)
        ids = torch.arange(b * prompt).remainder(250).reshape(b, prompt)
        run.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
        run.decode(ids[:, 0])
        kvo_caches = [cache for cache in run.caches if isinstance(cache, KVOCache)]
        one_launch: list[tuple[object, str]] = []
        for cache in kvo_caches:  # as on CUDA: pinned rows read in place, one gather kernel a part
            cache.k_rows.zero_copy = cache.v_rows.zero_copy = True
            one_launch += [(cache, "_decode_selected"), (cache.k_rows, "gather"), (cache.v_rows, "gather")]
        return count_ops(lambda: run.decode(ids[:, 0]), one_launch)

    base, with_dense, with_kvo = step_ops(dense - 1), step_ops(dense), step_ops(dense + 1)
    return with_kvo - with_dense, with_dense - base, base - (dense - 1) * (with_dense - base)


def hf_layer_ops(model: ModelConfig, offloaded: bool) -> tuple[int, int]:
    """(ops of one decoder layer, ops of a step outside its layers) of transformers' ``generate`` on
    the model's architecture (``DynamicCache``, or its offloaded variant), by differences of 2 and 1
    layers, 3 and 2 new tokens."""
    from transformers import AutoModelForCausalLM

    def generate_ops(num_layers: int, new_tokens: int) -> int:
        hf = AutoModelForCausalLM.from_config(_hf_config(tiny_config(model, num_layers))).eval()
        ids = torch.zeros(2, 16, dtype=torch.long)
        cache = {"cache_implementation": "offloaded"} if offloaded else {}
        with torch.inference_mode():

            def generate() -> object:
                return hf.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **cache,
                )  # fmt: skip

            generate()
            return count_ops(generate)

    step1 = generate_ops(1, 3) - generate_ops(1, 2)
    step2 = generate_ops(2, 3) - generate_ops(2, 2)
    return step2 - step1, step1 - (step2 - step1)


def _hf_config(config: ModelConfig) -> Any:
    """transformers' config of a kvpr ``ModelConfig`` (the fields ``ModelConfig.from_hf`` reads)."""
    from transformers import AutoConfig

    common = {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_q_heads, "max_position_embeddings": config.max_position,
    }  # fmt: skip
    if config.model_type == "opt":
        return AutoConfig.for_model(
            "opt", ffn_dim=config.intermediate_size, word_embed_proj_dim=config.hidden_size,
            do_layer_norm_before=config.pre_layer_norm, **common,
        )  # fmt: skip
    return AutoConfig.for_model(
        config.model_type, intermediate_size=config.intermediate_size, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, **common,
    )  # fmt: skip


def kv_codec_ops(model: ModelConfig, kv_codec: str) -> int:
    """Ops a tokenwise K,V codec adds to a layer of the offloaded executor: the new token's K,V
    encoded and each part copied to the host, and one landed range decoded and written into the
    layer's buffers, less the two copies each way of fp16 K,V that it replaces (0 for ``none``)."""
    from kvpr.cache.storage import tier_codec
    from kvpr.runtime.latency import decode_kv_into

    codec = tier_codec(kv_codec, TINY_HEAD_DIM)
    if codec is None:
        return 0
    k = v = torch.zeros(1, 2, 2, TINY_HEAD_DIM)  # [t, b, n_kv, d]
    encoded = codec.encode(k, v)
    out_k, out_v = torch.empty(4, 2, 2, TINY_HEAD_DIM), torch.empty(4, 2, 2, TINY_HEAD_DIM)
    encode = count_ops(lambda: codec.encode(k, v))
    decode = count_ops(lambda: decode_kv_into(codec, encoded, torch.float32, out_k, out_v, 0))
    return encode + decode + 2 * (len(encoded.tensors) - 2)
