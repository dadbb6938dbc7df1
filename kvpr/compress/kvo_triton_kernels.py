"""The Triton kernels of the fused KVO encoder (``kvo_triton.py`` launches them; see its docstring).

Imported on first use only: ``triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported,
so the CPU interpreter (tests) must be asked for before that.
"""

import triton
import triton.language as tl


@triton.jit
def chunk_order(scores, chunk, row, BN, S: tl.constexpr):
    """[P, S] int32: slot ``j`` of chunk ``p`` holds its token ``order[p, j]`` (stable, descending)."""
    ss = tl.arange(0, S)
    score = tl.load(scores + (chunk[:, None] * S + ss[None, :]) * BN + row).to(tl.float32)  # [P, S]
    mine, other = score[:, :, None], score[:, None, :]  # token i on axis 1, token j on axis 2
    ahead = (other > mine) | ((other == mine) & (ss[None, None, :] < ss[None, :, None]))
    rank = tl.sum(ahead.to(tl.int32), axis=2)  # [P, S]: the slot of token i
    return tl.sum(tl.where(rank[:, None, :] == ss[None, :, None], ss[None, None, :], 0), axis=2)


@triton.jit
def fit_range(lo, hi, LEVELS: tl.constexpr):
    """``quant.fit_range`` from a range's ends: (scale, zero), fp16."""
    zero = (lo - tl.abs(lo) * 0.0009765625).to(tl.float16)  # quant._OUTWARD = 2**-10
    step = (hi - zero.to(tl.float32)) * (1.0 / LEVELS)
    return (step * 1.0009765625).to(tl.float16), zero  # 1 + 2**-10


@triton.jit
def quantize(x, step, zero, LEVELS: tl.constexpr):
    """``quant.quantize`` with float32 ``step`` and ``zero``: int32 codes in [0, LEVELS]."""
    step = tl.where(step > 0, step, 1.0)
    y = tl.math.div_rn(x - zero, step)
    y = tl.minimum(tl.maximum(y, -1.0), LEVELS + 1.0)  # the final clamp's result is unchanged
    below = tl.floor(y)
    frac = y - below  # exact: |y| is small
    odd = below - 2.0 * tl.floor(below * 0.5)
    y = tl.where(frac > 0.5, below + 1.0, tl.where(frac < 0.5, below, below + odd))  # half to even
    return tl.minimum(tl.maximum(y, 0.0), LEVELS).to(tl.int32)


@triton.jit
def keep_largest(mag, COUNT: tl.constexpr, AXIS: tl.constexpr):
    """The ``COUNT`` largest of ``mag >= 0`` along ``AXIS``, the lower index winning a tie (what a
    stable descending sort puts first): the ``COUNT``-th largest value is found by stepping down the
    distinct values from the top (at most ``COUNT - 1`` steps, each a max and a count), then the
    entries above it are kept and, of those equal to it, the first ``room``."""
    level = tl.max(mag, axis=AXIS, keep_dims=True)
    room = tl.zeros(level.shape, dtype=tl.int32) + COUNT  # COUNT - #entries above ``level``
    for _ in range(COUNT - 1):
        ties = tl.sum((mag == level).to(tl.int32), axis=AXIS, keep_dims=True)
        below = tl.max(tl.where(mag < level, mag, -2.0), axis=AXIS, keep_dims=True)
        deeper = ties < room  # every entry equal to ``level`` is kept: the threshold is lower
        room = tl.where(deeper, room - ties, room)
        level = tl.where(deeper, below, level)
    equal = (mag == level).to(tl.int32)
    return (mag > level) | ((equal == 1) & (tl.cumsum(equal, axis=AXIS) - equal < room))


@triton.jit
def pack(codes, BITS: tl.constexpr):
    """[R, N] int32 codes packed along N little end first (``packing.pack_bits``): [R, N * BITS / 8]."""
    PER: tl.constexpr = 8 // BITS
    R: tl.constexpr = codes.shape[0]
    N: tl.constexpr = codes.shape[1]
    shifted = codes << ((tl.arange(0, N) % PER) * BITS)[None, :]
    if PER == 1:
        packed = shifted
    else:
        packed = tl.sum(tl.reshape(shifted, [R, N // PER, PER]), axis=2)  # fields never overlap: sum = or
    return packed


@triton.jit
def load_k(k, k_scale, k_zero, rows, channels, D: tl.constexpr, G: tl.constexpr, K_INT8: tl.constexpr):
    """Float32 K of ``rows`` (token * b * n_kv + sequence * n_kv + head, with a trailing unit axis)
    at ``channels``: as stored, or int8 codes dequantised as ``decode_recent_k`` does (two roundings)."""
    values = tl.load(k + rows * D + channels).to(tl.float32)
    if K_INT8:
        at = rows * (D // G) + channels // G
        values = values * tl.load(k_scale + at).to(tl.float32) + tl.load(k_zero + at).to(tl.float32)
    return values


@triton.jit
def encode_k(
    k,  # [t, b, n_kv, D] any float dtype, or K_INT8: uint8 codes of the recent form
    k_scale,  # K_INT8: fp16 [t, b, n_kv, D / G] (and k_zero); else unused
    k_zero,
    scores,  # [t, b, n_kv]
    order_out,  # uint8 [C, b, n_kv, S * ORDER_BITS / 8]
    a_codes,  # uint8 [C, b, n_kv, D * A_BITS / 8]
    a_scale,  # fp16 [C, b, n_kv, D / G] (and a_zero)
    a_zero,
    d_codes,  # uint8 [C, b, n_kv, S - 1, D / G * KB]
    d_scale,  # fp16 [C, b, n_kv, S - 1, D / G] or, per channel, [nG, b, n_kv, D] (and d_zero)
    d_zero,
    keep_out,  # uint8 [C, b, n_kv, S - 1, D / 8]
    BN,  # b * n_kv: rows per token
    S: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    DK: tl.constexpr,  # channels of this program: whole groups (ranges, picks and bytes stay inside)
    G: tl.constexpr,
    A_BITS: tl.constexpr,
    D_BITS: tl.constexpr,
    K_KEEP: tl.constexpr,
    KB: tl.constexpr,  # bytes of one group's kept codes
    ORDER_BITS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    K_INT8: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    NB: tl.constexpr = D // DK
    pair, block = pid // NB, pid % NB  # pair: the (V group, sequence, head); block: of channels
    g, row = pair // BN, pair % BN
    GROUPS: tl.constexpr = D // G
    GP: tl.constexpr = DK // G  # channel groups of this program
    A: tl.constexpr = S - 1
    A_LEVELS: tl.constexpr = (1 << A_BITS) - 1
    D_LEVELS: tl.constexpr = (1 << D_BITS) - 1
    pp, ss = tl.arange(0, P), tl.arange(0, S)
    dd = block * DK + tl.arange(0, DK)  # [DK]: this program's channels
    gg = block * GP + tl.arange(0, GP)  # [GP]: and their groups
    chunk = g * P + pp  # [P]
    order = chunk_order(scores, chunk, row, BN, S)  # [P, S]
    if block == 0:
        OB: tl.constexpr = S * ORDER_BITS // 8
        at = (chunk * BN + row)[:, None] * OB + tl.arange(0, OB)[None, :]
        tl.store(order_out + at, pack(order, ORDER_BITS).to(tl.uint8))
    token = chunk[:, None] * S + order  # [P, S] in slot order
    x = load_k(k, k_scale, k_zero, (token * BN + row)[:, :, None], dd[None, None, :], D, G, K_INT8)  # [P, S, DK]
    first = tl.sum(tl.where(ss[None, :] == 0, order, 0), axis=1)  # [P]: the anchors' tokens
    anchor = load_k(k, k_scale, k_zero, ((chunk * S + first) * BN + row)[:, None], dd[None, :], D, G, K_INT8)
    anchor = tl.reshape(anchor, [P, GP, G])
    scale, zero = fit_range(tl.min(anchor, axis=2), tl.max(anchor, axis=2), A_LEVELS)  # [P, GP]
    head = chunk * BN + row  # [P]: the (chunk, sequence, head) row of chunk-indexed outputs
    at = head[:, None] * GROUPS + gg[None, :]
    tl.store(a_scale + at, scale)
    tl.store(a_zero + at, zero)
    codes = quantize(anchor, scale.to(tl.float32)[:, :, None], zero.to(tl.float32)[:, :, None], A_LEVELS)
    AB: tl.constexpr = DK * A_BITS // 8  # this program's bytes of a row
    at = head[:, None] * (D * A_BITS // 8) + block * AB + tl.arange(0, AB)[None, :]
    tl.store(a_codes + at, pack(tl.reshape(codes, [P, DK]), A_BITS).to(tl.uint8))
    # dequantised anchor (two roundings, as torch's multiply then add), differences from it
    anchor = codes.to(tl.float32) * scale.to(tl.float32)[:, :, None] + zero.to(tl.float32)[:, :, None]
    diff = x - tl.reshape(anchor, [P, DK])[:, None, :]  # [P, S, DK]; slot 0 (the anchor) unused
    other = (ss >= 1)[None, :]  # [1, S]: the non-anchor slots
    slot_row = head[:, None] * A + ss[None, :] - 1  # [P, S]: row of [C, b, n_kv, A, *] outputs
    grouped = tl.reshape(diff, [P, S, GP, G])
    if PER_CHANNEL:  # one range per channel over the group's non-anchors
        live = other[:, :, None]
        lo = tl.min(tl.min(tl.where(live, diff, float("inf")), axis=1), axis=0)  # [DK]
        hi = tl.max(tl.max(tl.where(live, diff, float("-inf")), axis=1), axis=0)
        scale, zero = fit_range(lo, hi, D_LEVELS)
        tl.store(d_scale + pair * D + dd, scale)
        tl.store(d_zero + pair * D + dd, zero)
        step = tl.reshape(scale.to(tl.float32), [1, 1, GP, G])
        base = tl.reshape(zero.to(tl.float32), [1, 1, GP, G])
    else:  # one per token and channel group
        scale, zero = fit_range(tl.min(grouped, axis=3), tl.max(grouped, axis=3), D_LEVELS)  # [P, S, GP]
        at = slot_row[:, :, None] * GROUPS + gg[None, None, :]
        tl.store(d_scale + at, scale, mask=other[:, :, None])
        tl.store(d_zero + at, zero, mask=other[:, :, None])
        step, base = scale.to(tl.float32)[:, :, :, None], zero.to(tl.float32)[:, :, :, None]
    codes = quantize(grouped, step, base, D_LEVELS)  # [P, S, GP, G]
    kept = keep_largest(tl.abs(grouped), K_KEEP, 3)
    kept_int = kept.to(tl.int32)
    place = tl.cumsum(kept_int, axis=3) - kept_int  # a kept code's place among its group's
    PER: tl.constexpr = 8 // D_BITS
    shifted = codes << ((place % PER) * D_BITS)  # a kept code's bits in its byte of the compact row
    at = (slot_row[:, :, None] * GROUPS + gg[None, None, :]) * KB  # [P, S, GP]
    for byte_index in tl.static_range(KB):
        byte = tl.sum(tl.where(kept & (place // PER == byte_index), shifted, 0), axis=3)  # disjoint bits
        tl.store(d_codes + at + byte_index, byte.to(tl.uint8), mask=other[:, :, None])
    mask = tl.reshape(pack(tl.reshape(kept_int, [P * S, DK]), 1), [P, S, DK // 8]).to(tl.uint8)
    at = slot_row[:, :, None] * (D // 8) + block * (DK // 8) + tl.arange(0, DK // 8)[None, None, :]
    tl.store(keep_out + at, mask, mask=other[:, :, None])


@triton.jit
def encode_v(
    v,  # [t, b, n_kv, D] any float dtype
    scores,  # [t, b, n_kv]
    a_codes,  # uint8 [nG, b, n_kv, P, D * VA_BITS / 8]
    codes_out,  # uint8 [nG, b, n_kv, V_KEEP - P, D * V_BITS / 8]
    keep_out,  # uint8 [nG, b, n_kv, G - P, D / 8]
    scale_out,  # fp16 [nG, b, n_kv, D] (and zero_out)
    zero_out,
    BN,
    S: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    DB: tl.constexpr,  # channels of this program: V's ranges and picks are per channel
    V_BITS: tl.constexpr,
    VA_BITS: tl.constexpr,
    V_KEEP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    NB: tl.constexpr = D // DB
    head, block = pid // NB, pid % NB  # head: the (V group, sequence, head) row of the outputs
    g, row = head // BN, head % BN
    T: tl.constexpr = P * S  # the group's tokens
    A: tl.constexpr = S - 1
    KEPT: tl.constexpr = V_KEEP - P  # kept non-anchors
    LEVELS: tl.constexpr = (1 << V_BITS) - 1
    A_LEVELS: tl.constexpr = (1 << VA_BITS) - 1
    pp, ss, tt = tl.arange(0, P), tl.arange(0, S), tl.arange(0, T)
    dd = block * DB + tl.arange(0, DB)  # [DB]: this program's channels
    chunk = g * P + pp
    order = chunk_order(scores, chunk, row, BN, S)  # [P, S]
    token = tl.reshape(chunk[:, None] * S + order, [T])  # [T] in slot order, chunk by chunk
    x = tl.load(v + ((token * BN + row) * D)[:, None] + dd[None, :]).to(tl.float32)  # [T, DB]
    scale, zero = fit_range(tl.min(x, axis=0), tl.max(x, axis=0), LEVELS)  # [DB]
    tl.store(scale_out + head * D + dd, scale)
    tl.store(zero_out + head * D + dd, zero)
    step, base = scale.to(tl.float32)[None, :], zero.to(tl.float32)[None, :]
    first = tl.sum(tl.where(ss[None, :] == 0, order, 0), axis=1)  # [P]
    anchor = tl.load(v + ((chunk * S + first) * BN + row)[:, None] * D + dd[None, :]).to(tl.float32)
    codes = quantize(anchor, step * (LEVELS / A_LEVELS), base, A_LEVELS)  # [P, DB]: a finer grid
    AB: tl.constexpr = DB * VA_BITS // 8  # this program's bytes of a row
    at = (head * P + pp)[:, None] * (D * VA_BITS // 8) + block * AB + tl.arange(0, AB)[None, :]
    tl.store(a_codes + at, pack(codes, VA_BITS).to(tl.uint8))
    is_anchor = (tt % S == 0)[:, None]  # [T, 1]
    other_row = head * (T - P) + (tt // S) * A + tt % S - 1  # [T]: row of the non-anchor outputs
    if KEPT > 0:
        mag = tl.where(is_anchor, -1.0, tl.abs(x))  # anchors are stored apart, never picked here
        kept = keep_largest(mag, KEPT, 0)  # [T, DB]
    else:
        kept = tl.zeros([T, DB], dtype=tl.int1)
    kept_int = kept.to(tl.int32)
    place = tl.cumsum(kept_int, axis=0) - kept_int
    codes = quantize(x, step, base, LEVELS)  # [T, DB]
    CB: tl.constexpr = DB * V_BITS // 8
    for place_index in tl.static_range(KEPT):
        picked = tl.sum(tl.where(kept & (place == place_index), codes, 0), axis=0)  # [DB]
        at = (head * KEPT + place_index) * (D * V_BITS // 8) + block * CB + tl.arange(0, CB)
        tl.store(codes_out + at, tl.reshape(pack(picked[None, :], V_BITS), [CB]).to(tl.uint8))
    mask = pack(kept_int, 1).to(tl.uint8)  # [T, DB / 8]
    at = other_row[:, None] * (D // 8) + block * (DB // 8) + tl.arange(0, DB // 8)[None, :]
    tl.store(keep_out + at, mask, mask=~is_anchor)


@triton.jit
def quantize_rows(
    x,  # [rows, D] any float dtype
    codes,  # uint8 [rows, D] (8-bit codes: packing is the identity)
    scale,  # fp16 [rows, D / G] (and zero)
    zero,
    num_rows,
    D: tl.constexpr,
    G: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """``quant.quantize_groups(x.float(), 8, G)`` of ``BLOCK_ROWS`` rows: the recent window's K."""
    GROUPS: tl.constexpr = D // G
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
    live = (rows < num_rows)[:, None]  # [R, 1]
    values = tl.load(x + rows[:, None] * D + tl.arange(0, D)[None, :], mask=live, other=0).to(tl.float32)
    grouped = tl.reshape(values, [BLOCK_ROWS, GROUPS, G])
    step, base = fit_range(tl.min(grouped, axis=2), tl.max(grouped, axis=2), 255)  # [R, GROUPS]
    at = rows[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
    tl.store(scale + at, step, mask=live)
    tl.store(zero + at, base, mask=live)
    quantized = quantize(grouped, step.to(tl.float32)[:, :, None], base.to(tl.float32)[:, :, None], 255)
    out = tl.reshape(quantized, [BLOCK_ROWS, D]).to(tl.uint8)
    tl.store(codes + rows[:, None] * D + tl.arange(0, D)[None, :], out, mask=live)
