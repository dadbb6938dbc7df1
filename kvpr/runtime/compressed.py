"""Latency mode for the cache methods that are not tokenwise codecs: KVO, KIVI, H2O, StreamingLLM, Quest.

Prefill is dense and exact; each layer's cache then stores the prompt in its method's form. A decode
step, per layer::

    q, k, v of the new token -> cache.decode: store the token | read what the method reads (KVO: score
    chunks by q . K_anchor, gather the selected chunks' packed rows, decode) | attend | feed back scores

With ``--offload cpu`` (KVO, KIVI) the packed rows live in host memory and only what a step reads
crosses the link (``kvpr.cache.rows``); anchors, recent windows and the dense first layers stay on
the device. The same code runs on a CPU, with memory copies for the link.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvpr.cache.rows import GatherStaging
from kvpr.cache.storage import CacheShape
from kvpr.compress.kvo_config import check_head_dim
from kvpr.compress.kvo_scores import band_scores, prefill_attention
from kvpr.compress.methods import METHOD_CONFIGS, OFFLOADABLE, method_config, uncompressed_layers
from kvpr.compress.rotation import check_rotation
from kvpr.config import KIVI_METHODS, RECOMPUTE_AUTO, RECOMPUTE_OFF, CacheConfig, ModelConfig, Offload
from kvpr.errors import KvprError
from kvpr.models.common import attend
from kvpr.runtime.batch import BatchState
from kvpr.runtime.budget_caches import H2OCache, QuestCache, StreamingCache
from kvpr.runtime.kvo_cache import KVOCache, kvo_layouts, kvo_split
from kvpr.runtime.layer_caches import DenseCache, KiviCache, LayerCache, received_attention
from kvpr.runtime.streams import StreamSet

if TYPE_CHECKING:
    from kvpr.models.base import DecoderModel


@dataclass(frozen=True)
class CacheMethod:
    """A cache method bound to a model: builds each layer's cache and states its sizes.

    ``name``/``tokenwise`` mirror a codec's, so the engine can hold either; sizes count K and V of
    one sequence, metadata included, with dense layers in fp16 (``element``).
    """

    name: str
    config: Any
    model: ModelConfig
    tokenwise: ClassVar[bool] = False

    @property
    def offloadable(self) -> bool:
        return self.name in OFFLOADABLE

    def dense_layer(self, layer: int) -> bool:
        return layer < uncompressed_layers(self.config)

    def layer_cache(
        self,
        layer: int,
        shape: CacheShape,
        device: torch.device,
        on_host: bool = False,
        pin: bool = False,
        staging: GatherStaging | None = None,
        compile: bool = False,
    ) -> LayerCache:
        if self.dense_layer(layer):
            return DenseCache(shape, device)
        if self.name == "kvo":
            return KVOCache(self.config, shape, device, on_host, pin, staging, compile)
        if self.name in KIVI_METHODS:
            return KiviCache(self.config, shape, device, on_host, pin, staging)
        return {"h2o": H2OCache, "streaming": StreamingCache, "quest": QuestCache}[self.name](
            self.config, shape, device
        )

    def layer_bytes(self, context_len: int, element: int = 2) -> tuple[float, float]:
        """(stored, read by one decode step) bytes of one compressed layer at ``context_len`` tokens
        (KVO's read: an upper bound, see below)."""
        cfg, n, d, s = self.config, self.model.num_kv_heads, self.model.head_dim, context_len
        token = 2 * n * d * element  # K and V of one token, uncompressed
        if self.name == "kvo":
            parts, k_layout, v_layout = kvo_layouts(cfg, d)
            anchor = sum(parts[name][0, 0, 0].numel() * parts[name].element_size() for name in _ANCHORS)
            order = parts["order"].shape[-1]
            chunks, recent = kvo_split(cfg, s)
            recent_bytes = recent * n * (d + 4 * d // cfg.group + 2 * d)  # K int8 + scale, zero; V fp16
            per_chunk = anchor + k_layout.row_bytes + order + v_layout.row_bytes / cfg.anchors_per_group
            selected = min(cfg.top_chunks, chunks)
            # Chunks of one V group share its row, read once: at most min(selected, groups) rows (exact
            # when every chunk is selected; fewer where the selection leaves groups out).
            v_rows = min(selected, chunks // cfg.anchors_per_group)
            read = chunks * n * anchor + selected * n * k_layout.row_bytes + v_rows * n * v_layout.row_bytes
            return chunks * n * per_chunk + recent_bytes, read + recent_bytes
        if self.name in KIVI_METHODS:
            quantised = s // cfg.residual * cfg.residual
            stored = quantised * KiviCache.bytes_per_token(cfg, n, d) + (s - quantised) * 2 * n * d * 2
            return stored, stored
        if self.name == "h2o":
            return min(s, cfg.budget) * token, min(s, cfg.budget + 1) * token
        if self.name == "streaming":
            return min(s, cfg.budget) * token, min(s, cfg.budget) * token
        pages, newest = s // cfg.page_size, (s - 1) // cfg.page_size  # quest
        read_pages = min(cfg.budget // cfg.page_size - 1, newest)
        if read_pages == newest:
            read = s * token
        else:
            read = (read_pages * cfg.page_size + s - newest * cfg.page_size) * token + newest * token
        return s * token + pages * token, read

    def footprint(self, context_len: int, element: int = 2) -> tuple[float, float]:
        """(stored, read per decode step) bytes of K and V per token of context, all layers."""
        dense = sum(self.dense_layer(layer) for layer in range(self.model.num_layers))
        stored, read = self.layer_bytes(context_len, element)
        token = 2 * self.model.kv_size * element
        compressed = self.model.num_layers - dense
        return (
            (dense * context_len * token + compressed * stored) / context_len,
            (dense * context_len * token + compressed * read) / context_len,
        )

    def bytes_per_token(self, b: int, n_kv: int, d: int) -> float:
        """Average stored bytes of one token of one layer at the model's full context (codec-like)."""
        return b * self.footprint(self.model.max_position)[0] / self.model.num_layers

    def memory(self, shape: CacheShape, offloaded: bool) -> tuple[int, int]:
        """(device, host) bytes the caches of a batch allocate (upper bounds, before any is made)."""
        e, b, n, d, s = shape.element_size, shape.batch_size, shape.num_kv_heads, shape.head_dim, shape.max_len
        dense = sum(self.dense_layer(layer) for layer in range(shape.num_layers))
        compressed = shape.num_layers - dense
        device = dense * 2 * s * b * n * d * e
        held = int(self.layer_bytes(s, e)[0] * b) + b * n * 4096  # one layer; slack for whole windows/blocks
        if not offloaded:
            return device + compressed * held, 0
        cfg, staging = self.config, 0
        if self.name == "kvo":  # anchors and the recent window stay on the device; one layer's gather is staged
            parts, k_layout, v_layout = kvo_layouts(cfg, d)
            anchor = sum(parts[name][0, 0, 0].numel() * parts[name].element_size() for name in _ANCHORS)
            chunks = kvo_split(cfg, s)[0] + cfg.window // cfg.chunk
            device += compressed * b * n * (chunks * anchor + 2 * cfg.window * (3 * d + 4 * d // cfg.group + 5))
            staging = b * n * min(cfg.top_chunks, chunks) * (k_layout.row_bytes + v_layout.row_bytes)
        else:  # KIVI: the fp16 residual stays on the device
            device += compressed * b * (cfg.residual * n * d * 4 + s)
        return device, compressed * held + staging


_ANCHORS = ("k_anchor_codes", "k_anchor_scale", "k_anchor_zero")

# Why partial recomputation is off for each method (a step would need X of the tokens it reads).
_NO_RECOMPUTE = {
    "kvo": "a step reads only the selected chunks, stored at about 2 bits per value, and recomputing them "
    "needs their X in the model dtype, several times those bytes, so it can never pay",
    **{
        name: f"K,V are stored at about {METHOD_CONFIGS[name].bits} bits per value and X in the model dtype "
        "takes more bytes than they do, so recomputing can never pay"
        for name in KIVI_METHODS
    },
    "h2o": "its cache holds only the budget, on the compute device: nothing crosses the link",
    "streaming": "its cache holds only the budget, on the compute device: nothing crosses the link",
    "quest": "its cache stays on the compute device: nothing crosses the link",
}


def make_method(cache: CacheConfig, model: ModelConfig) -> CacheMethod:
    """The cache method of ``--kv-codec`` (a name of ``kvpr.compress.methods``), checked against the
    placement and the model before any weight loads."""
    name = cache.kv_codec
    config = method_config(name, cache.kv_codec_params)
    if cache.recompute not in (RECOMPUTE_OFF, RECOMPUTE_AUTO, 0.0):
        raise KvprError(f"--recompute {cache.recompute} is off for --kv-codec {name}: {_NO_RECOMPUTE[name]}")
    if cache.offload is Offload.CPU and name not in OFFLOADABLE:
        raise KvprError(f"--kv-codec {name} keeps its cache on the compute device: drop --offload cpu")
    if cache.gpu_resident != 0:
        raise KvprError(f"--gpu-resident applies to the fp16/int8/int4 host tier, not --kv-codec {name}")
    if name == "kvo":
        check_head_dim(model.head_dim, config)
    if name in KIVI_METHODS:
        check_rotation(config.rotate, model.head_dim)
    group = getattr(config, "group_size", 1)
    if model.head_dim % group:
        raise KvprError(f"--kv-codec {name}: head_dim {model.head_dim} is not a multiple of group_size {group}")
    return CacheMethod(name, config, model)


class CompressedExecutor:
    """Runs one batch with a :class:`CacheMethod`: ``prefill`` once, then ``decode`` per token.

    Args:
        model: weights on ``device``. method: the cache method. shape: batch, slots, dtype.
        offloaded: packed rows in host memory (KVO, KIVI); pin: page-locked (CUDA present).
        compile: KVO decodes the selected chunks with fused (``torch.compile``) kernels.
    """

    def __init__(
        self,
        model: "DecoderModel",
        method: CacheMethod,
        shape: CacheShape,
        device: torch.device,
        offloaded: bool,
        pin: bool,
        compile: bool = False,
    ) -> None:
        self.model, self.method, self.device, self.dtype = model, method, device, shape.dtype
        self.layers = model.decoder_layers
        self.batch = BatchState(shape.batch_size, shape.max_len, device)
        self.staging = GatherStaging(pin) if offloaded else None
        self.caches: list[LayerCache] = [
            method.layer_cache(layer, shape, device, offloaded, pin, self.staging, compile)
            for layer in range(len(self.layers))
        ]
        self.streams = StreamSet(device)
        self.recompute_lens: list[int] = []  # always 0: the token loop reports it per step

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, valid: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Dense prefill of [b, q] (``valid`` marks real tokens); each cache stores the prompt."""
        positions, mask = self.batch.append(valid)
        rope = self.model.rope(positions, self.dtype)  # [b, q, 1, d]
        hidden = self.model.embed(input_ids, positions)  # [b, q, h]
        for layer, cache in zip(self.layers, self.caches):
            x = layer.attn_input(hidden)  # [b, q, h]
            k, v = layer.kv_from_input(x, rope)  # [b, q, n_kv, d]
            q = layer.query(x, rope)  # [b, n_q, q, d]
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [b, n_kv, q, d]
            window = cache.prefill_queries
            if isinstance(cache, KVOCache) and window is not None:
                # the attention's own log-sum-exp normalises the band of scores: no second full QK^T
                out, lse = prefill_attention(q, keys, values, mask)  # [b, q, n_q * d], [b, n_q, q]
                scores = band_scores(q, keys, valid, lse, window)  # [q, b, n_kv]
            else:
                out = attend(q, keys, values, mask)
                scores = None if window is None else received_attention(q, keys, valid, window)  # [q, b, n_kv]
            cache.prefill(k.transpose(0, 1), v.transpose(0, 1), valid.T, scores)
            hidden = layer.finish(hidden, out)
        if not all_logits:
            hidden = hidden[:, -1:]
        return self.model.logits(hidden)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row, token_ids [b] -> logits [b, V]."""
        self.recompute_lens.append(0)
        positions = self.batch.advance(torch.ones_like(token_ids, dtype=torch.bool).unsqueeze(1))
        hidden = self.model.embed(token_ids.unsqueeze(1), positions)  # [b, 1, h]
        rope = self.model.rope(positions, self.dtype)  # [b, 1, 1, d]
        for layer, cache in zip(self.layers, self.caches):
            x = layer.attn_input(hidden)  # [b, 1, h]
            q = layer.query(x, rope)[:, :, 0]  # [b, n_q, d]
            k, v = layer.kv_from_input(x, rope)  # [b, 1, n_kv, d]
            out = cache.decode(q, k[:, 0], v[:, 0])  # [b, n_q * d]
            hidden = layer.finish(hidden, out.unsqueeze(1))
        return self.model.logits(hidden)[:, -1]

    def step_bytes(self) -> tuple[int, int]:
        """(read from the caches, copied over the link) by the last decode step, all layers."""
        return sum(c.read_bytes for c in self.caches), sum(c.link_bytes for c in self.caches)

    def nbytes(self) -> int:
        """Bytes the caches hold now."""
        return sum(cache.nbytes() for cache in self.caches)

    def host_nbytes(self) -> int:
        """Host memory the caches allocated: every offloaded row tier plus the pinned gather staging."""
        tiers = sum(cache.host_nbytes() for cache in self.caches if isinstance(cache, (KVOCache, KiviCache)))
        return tiers + (self.staging.nbytes if self.staging is not None else 0)

    def finish(self) -> None:
        self.streams.synchronize()

    close = finish  # nothing held outside memory
