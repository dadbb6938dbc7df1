"""What one decode step asks of a machine: the operators of every layer, their MACs, element-wise work
and external-memory bytes, with the K,V bytes taken from kvpr's own codecs and runtime layouts.

One decode step of a batch of ``b`` sequences with ``s`` cached tokens each (the new token appended
first, as the runtime does), per layer:

| op            | unit      | work                                   | external bytes                          |
|---------------|-----------|----------------------------------------|-----------------------------------------|
| qkv           | matrix    | [b, h] x [h, (n_q + 2 n_kv) d]         | weights                                 |
| anchor_score  | attention | q . K_anchor, every finalised chunk    | anchors (KVO layers only)               |
| topk          | attention | top ``top_chunks`` of C chunk scores   | -                                       |
| dsq           | attention | dequantise selected chunks + recent    | K rows, V rows, recent window           |
| dequant       | attention | int8/int4 K,V back to the MAC width    | (its bytes are the score/sv reads)      |
| score         | attention | q . K over the attended tokens         | K (dense codecs)                        |
| softmax       | attention | over the attended tokens               | -                                       |
| sv            | attention | p . V over the attended tokens         | V (dense codecs)                        |
| o_proj, mlp_* | matrix    | [b, n_q d] x [n_q d, h]; the MLP       | weights                                 |
| lm_head       | matrix    | [b, h] x [h, vocab], once per step     | weights                                 |

``inter_bytes`` of an op is its output that the next op of the attention chain reads: written to and
read back from external memory unless the chain is fused. KVO's bytes are those of
:class:`kvpr.runtime.kvo_cache.KVOCache` (``read_bytes``, ``link_bytes``), the dense codecs' those
of ``bytes_per_token`` (:mod:`kvpr.cache.codec`); ``tests/test_sim.py`` holds both to the runtime.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field

from kvpr.config import Arch, ModelConfig
from kvpr.errors import KvprError

DENSE_CODECS = ("fp16", "int8", "int4")
SIM_CODECS = (*DENSE_CODECS, "kvo")


class Unit(str, enum.Enum):
    """Which engine runs an op: the matrix cores (projections, MLP) or the attention core."""

    MATRIX = "matrix"
    ATTENTION = "attention"


class VRows(str, enum.Enum):
    """How a KVO step reads the V group rows its selected chunks share (4 chunks per 32-token group)."""

    PER_CHUNK = "per-chunk"  # once per selected chunk: the runtime's zero-copy gather over PCIe
    DISTINCT = "distinct"  # once per distinct group: the staged gather, and the accelerator's fetch


@dataclass(frozen=True)
class Gemm:
    """``count`` independent products [m, k] x [k, n]."""

    m: int
    k: int
    n: int
    count: int = 1

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class Op:
    """One operator of one layer, for the whole batch.

    ``kv_bytes`` are cache reads in ``kv_run_bytes``-long contiguous runs (a DRAM access each);
    ``weight_bytes`` stream in long runs; ``inter_bytes`` is the output the next op reads back.
    """

    name: str
    unit: Unit
    macs: int = 0
    elements: int = 0  # element-wise work: compares, exponentials, dequantised values
    gemm: Gemm | None = None
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    kv_run_bytes: float = 0.0
    inter_bytes: float = 0.0
    precision: str = "int8"  # operand width of the MACs: int8, fp16 (int4 for 4-bit weights)


@dataclass(frozen=True)
class LayerWork:
    """The ops of ``count`` identical layers."""

    kind: str  # "dense" or "kvo"
    count: int
    ops: tuple[Op, ...]

    def op(self, name: str) -> Op:
        return next(op for op in self.ops if op.name == name)


@dataclass(frozen=True)
class DecodeStep:
    """One decode step of a batch: the layer groups and the LM head."""

    model: str
    batch_size: int
    context_len: int  # cached tokens before the step
    codec: str
    layers: tuple[LayerWork, ...]
    head: tuple[Op, ...]
    kv_read_bytes: float  # every layer's cache reads (the runtime's read_bytes, all layers)
    kv_link_bytes: float  # of those, what crosses PCIe when the cache lives in host memory
    notes: dict[str, float] = field(default_factory=dict)

    def all_ops(self) -> list[tuple[Op, int]]:
        """(op, how many times the step runs it)."""
        return [(op, group.count) for group in self.layers for op in group.ops] + [(op, 1) for op in self.head]

    @property
    def macs(self) -> int:
        return sum(op.macs * count for op, count in self.all_ops())

    @property
    def weight_bytes(self) -> float:
        return sum(op.weight_bytes * count for op, count in self.all_ops())


# -- the linear layers ----------------------------------------------------------------------------


def linear_ops(model: ModelConfig, b: int, weight_bits: int) -> tuple[tuple[Op, ...], tuple[Op, ...]]:
    """(the projections before attention, those after it) of one layer, weights of ``weight_bits``."""
    h, d, ffn = model.hidden_size, model.head_dim, model.intermediate_size
    width = weight_bits / 8
    precision = "int4" if weight_bits == 4 else "int8" if weight_bits == 8 else "fp16"

    def linear(name: str, k: int, n: int) -> Op:
        gemm = Gemm(b, k, n)
        return Op(name, Unit.MATRIX, macs=gemm.macs, gemm=gemm, weight_bytes=k * n * width, precision=precision)

    qkv = linear("qkv", h, (model.num_q_heads + 2 * model.num_kv_heads) * d)
    after = [linear("o_proj", model.q_size, h)]
    if model.arch is Arch.LLAMA:  # SwiGLU: gate and up fused, then down
        after += [linear("mlp_up", h, 2 * ffn), linear("mlp_down", ffn, h)]
    else:
        after += [linear("mlp_up", h, ffn), linear("mlp_down", ffn, h)]
    return (qkv,), tuple(after)


def head_op(model: ModelConfig, b: int, weight_bits: int) -> Op:
    gemm = Gemm(b, model.hidden_size, model.vocab_size)
    precision = "int8" if weight_bits == 8 else "int4" if weight_bits == 4 else "fp16"
    return Op("lm_head", Unit.MATRIX, gemm.macs, gemm=gemm, weight_bytes=gemm.k * gemm.n * weight_bits / 8,
              precision=precision)  # fmt: skip


# -- the attention of one layer -------------------------------------------------------------------


def dense_kv_bytes_per_token(codec: str, b: int, n_kv: int, d: int) -> float:
    """K and V bytes of one token in one layer for the batch, as the codec stores them."""
    from kvpr.cache.codec import make_codec

    return float(make_codec(codec).bytes_per_token(b, n_kv, d))


def dense_attention(model: ModelConfig, b: int, s: int, codec: str) -> tuple[Op, ...]:
    """Attention over all ``s + 1`` tokens with K,V stored by a dense codec (fp16, int8, int4)."""
    n_q, n_kv, d = model.num_q_heads, model.num_kv_heads, model.head_dim
    tokens, group = s + 1, n_q // n_kv
    kv = dense_kv_bytes_per_token(codec, b, n_kv, d) * tokens  # [b, n_kv, s+1, d] twice, as stored
    run = kv / (2 * b * n_kv)  # each (sequence, head) row of K (or V) is one contiguous block
    score = Gemm(group, d, tokens, b * n_kv)  # the query heads of a KV head share its K
    ops = []
    if codec != "fp16":  # integer MACs on the codes; each group's scale and zero applied to its partial sum
        groups = 2 * b * n_kv * tokens * d // 32
        ops.append(Op("dequant", Unit.ATTENTION, elements=groups))
    fp = "int8" if codec != "fp16" else "fp16"
    probs = b * n_q * tokens * 2  # fp16 scores / probabilities
    ops += [
        Op("score", Unit.ATTENTION, score.macs, gemm=score, kv_bytes=kv / 2, kv_run_bytes=run, inter_bytes=probs,
           precision=fp),
        Op("softmax", Unit.ATTENTION, elements=b * n_q * tokens, inter_bytes=probs),
        Op("sv", Unit.ATTENTION, score.macs, gemm=Gemm(group, tokens, d, b * n_kv), kv_bytes=kv / 2,
           kv_run_bytes=run, precision=fp),
    ]  # fmt: skip
    return tuple(ops)


@functools.cache
def kvo_row_bytes(config_items: tuple[tuple[str, object], ...], d: int) -> tuple[int, int, int]:
    """(anchor bytes per chunk, K row bytes per chunk, V row bytes per group) of one (sequence, head),
    read off the runtime's own layouts (one tiny probe encoding, cached)."""
    from kvpr.compress.kvo_config import KVOConfig
    from kvpr.runtime.kvo_cache import ANCHOR_NAMES, kvo_layouts

    parts, k_layout, v_layout = kvo_layouts(KVOConfig(**dict(config_items)), d)
    anchor = sum(parts[name][0, 0, 0].numel() * parts[name].element_size() for name in ANCHOR_NAMES)
    return int(anchor), k_layout.row_bytes, v_layout.row_bytes


def kvo_recent_bytes_per_token(d: int, group: int) -> int:
    """One recent token of one (sequence, head): K int8 codes, fp16 scale and zero per group, V fp16."""
    return d + 4 * d // group + 2 * d


def expected_distinct_groups(num_chunks: int, selected: int, per_group: int) -> float:
    """Expected distinct V groups among ``selected`` of ``num_chunks`` chunks drawn uniformly
    (a group is missed when none of its ``per_group`` chunks is drawn)."""
    if selected >= num_chunks:
        return float(math.ceil(num_chunks / per_group))
    groups = num_chunks // per_group
    miss = math.comb(num_chunks - per_group, selected) / math.comb(num_chunks, selected)
    return groups * (1.0 - miss)


@dataclass(frozen=True)
class KVOReads:
    """What one KVO layer reads in a decode step, for the whole batch (bytes)."""

    num_chunks: int
    selected: int
    recent: int
    anchor_bytes: float
    k_row_bytes: float
    v_row_bytes: float
    recent_bytes: float
    v_group_reads: float  # V group rows read per (sequence, head)

    @property
    def read_bytes(self) -> float:
        return self.anchor_bytes + self.k_row_bytes + self.v_row_bytes + self.recent_bytes

    @property
    def link_bytes(self) -> float:
        """The rows crossing PCIe when they live in host memory (anchors, recent window stay on the device)."""
        return self.k_row_bytes + self.v_row_bytes


def kvo_reads(model: ModelConfig, b: int, s: int, config: object, v_rows: VRows,
              distinct_groups: float | None = None) -> KVOReads:  # fmt: skip
    """The bytes :class:`kvpr.runtime.kvo_cache.KVOCache` reads in the step that appends token ``s``.

    ``distinct_groups``: V groups read per (sequence, head) under ``VRows.DISTINCT``; default the
    expectation under a uniform selection (the runtime counts the selection it made).
    """
    from dataclasses import asdict

    from kvpr.compress.kvo_config import KVOConfig
    from kvpr.runtime.kvo_cache import kvo_split

    assert isinstance(config, KVOConfig)
    n, d = model.num_kv_heads, model.head_dim
    anchor, k_row, v_row = kvo_row_bytes(tuple(asdict(config).items()), d)
    chunks, recent = kvo_split(config, s + 1)
    m = min(config.top_chunks, chunks)
    if v_rows is VRows.PER_CHUNK:
        groups = float(m)
    else:
        groups = (
            expected_distinct_groups(chunks, m, config.anchors_per_group)
            if distinct_groups is None
            else distinct_groups
        )
    heads = b * n
    return KVOReads(
        num_chunks=chunks,
        selected=m,
        recent=recent,
        anchor_bytes=float(heads * chunks * anchor) if m else 0.0,
        k_row_bytes=float(heads * m * k_row),
        v_row_bytes=heads * groups * v_row if m else 0.0,
        recent_bytes=float(heads * recent * kvo_recent_bytes_per_token(d, config.group)),
        v_group_reads=groups if m else 0.0,
    )


def kvo_attention(model: ModelConfig, b: int, reads: KVOReads, chunk: int) -> tuple[Op, ...]:
    """Select, dequantise (DSQ) and attend over the selected chunks and the recent window."""
    n_q, n_kv, d = model.num_q_heads, model.num_kv_heads, model.head_dim
    group, heads = n_q // n_kv, b * n_kv
    C, m, r = reads.num_chunks, reads.selected, reads.recent
    tokens = m * chunk + r
    score = Gemm(group, d, tokens, heads)
    dsq_out = heads * tokens * d * 2  # K and V at 8 bits, the attention MACs' width
    row_run = (reads.k_row_bytes + reads.v_row_bytes) / max(heads * (m + reads.v_group_reads), 1)
    ops = []
    if C and m < C:  # top_chunks covering every chunk: all are read, none scored
        anchor = Gemm(group, d, C, heads)
        ops += [
            Op("anchor_score", Unit.ATTENTION, anchor.macs, gemm=anchor, kv_bytes=reads.anchor_bytes,
               kv_run_bytes=reads.anchor_bytes / heads, inter_bytes=heads * C * 2),
            Op("topk", Unit.ATTENTION, elements=b * n_q * C, inter_bytes=heads * m * 4),
        ]  # fmt: skip
    # every chunk attended (none scored): the anchors are read with their chunks' rows
    anchors_here = 0.0 if ops else reads.anchor_bytes
    ops += [
        Op("dsq", Unit.ATTENTION, elements=2 * heads * tokens * d,
           kv_bytes=reads.k_row_bytes + reads.v_row_bytes + anchors_here, kv_run_bytes=row_run, inter_bytes=dsq_out),
        Op("recent", Unit.ATTENTION, kv_bytes=reads.recent_bytes, kv_run_bytes=reads.recent_bytes / max(heads, 1)),
        Op("score", Unit.ATTENTION, score.macs, gemm=score, inter_bytes=b * n_q * tokens * 2),
        Op("softmax", Unit.ATTENTION, elements=b * n_q * tokens, inter_bytes=b * n_q * tokens * 2),
        Op("sv", Unit.ATTENTION, score.macs, gemm=Gemm(group, tokens, d, heads)),
    ]  # fmt: skip
    return tuple(ops)


# -- the step ---------------------------------------------------------------------------------------


def decode_step(
    model: ModelConfig,
    name: str,
    b: int,
    s: int,
    codec: str = "fp16",
    kvo_config: object | None = None,
    weight_bits: int = 8,
    v_rows: VRows = VRows.DISTINCT,
) -> DecodeStep:
    """The decode step that appends token ``s`` (``s`` cached before it) for ``b`` sequences."""
    if codec not in SIM_CODECS:
        raise KvprError(f"kvpr sim models K,V codecs {', '.join(SIM_CODECS)}, not {codec!r}")
    if b < 1 or s < 0:
        raise KvprError(f"batch {b} and context {s}: need a batch >= 1 and a context >= 0")
    before, after = linear_ops(model, b, weight_bits)
    L, n_kv, d = model.num_layers, model.num_kv_heads, model.head_dim
    fp16_read = dense_kv_bytes_per_token("fp16", b, n_kv, d) * (s + 1)
    if codec != "kvo":
        attention = dense_attention(model, b, s, codec)
        read = sum(op.kv_bytes for op in attention)
        layers = (LayerWork("dense", L, before + attention + after),)
        return DecodeStep(name, b, s, codec, layers, (head_op(model, b, weight_bits),), L * read, L * read)
    from kvpr.compress.kvo_config import KVOConfig

    config = kvo_config if kvo_config is not None else KVOConfig()
    assert isinstance(config, KVOConfig)
    dense = min(config.uncompressed_layers, L)
    reads = kvo_reads(model, b, s, config, v_rows)
    layers = []
    if dense:  # the first layers stay fp16 on the device, attended densely
        layers.append(LayerWork("dense", dense, before + dense_attention(model, b, s, "fp16") + after))
    if L - dense:
        layers.append(LayerWork("kvo", L - dense, before + kvo_attention(model, b, reads, config.chunk) + after))
    notes = {
        "chunks": reads.num_chunks,
        "selected_chunks": reads.selected,
        "recent_tokens": reads.recent,
        "v_group_reads": reads.v_group_reads,
        "kvo_layer_read_bytes": reads.read_bytes,
        "fp16_layer_read_bytes": fp16_read,
    }
    return DecodeStep(
        name,
        b,
        s,
        codec,
        tuple(layers),
        (head_op(model, b, weight_bits),),
        kv_read_bytes=dense * fp16_read + (L - dense) * reads.read_bytes,
        kv_link_bytes=(L - dense) * reads.link_bytes,
        notes=notes,
    )
