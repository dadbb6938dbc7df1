"""The token loop: prefill, then feed any forced tokens, then decode and sample until every row stops.

A server drives the same executors step by step instead: ``RowBatch`` lets prompts join a running
batch between decode steps, ``FixedBatch`` runs caches that must be prefilled whole.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import record_function

from kvpr.config import SamplingParams
from kvpr.models.common import attend
from kvpr.runtime.batch import BatchState
from kvpr.runtime.executor import Executor
from kvpr.runtime.sampling import make_generator, sample_next
from kvpr.runtime.streams import TokenMailbox
from kvpr.runtime.tiers import TierState

TokenCallback = Callable[[int, int], None]  # (row, token id), called as each token is chosen


@dataclass
class GenerationOutput:
    """New tokens of every row (EOS included when hit) and what the run cost.

    ``prefill_s`` runs from the start to the first new token on the host (prefill plus any forced
    tokens); ``step_s`` holds one entry per later token, the time between two tokens on the host.
    """

    tokens: list[list[int]]
    finished_by_eos: list[bool]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    recompute_lens: list[int] = field(default_factory=list)  # l at each decode step
    host_lens: list[int] = field(default_factory=list)  # host-tier tokens at each decode step


def generate_tokens(
    executor: Executor,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    params: SamplingParams,
    eos_ids: tuple[int, ...],
    on_token: TokenCallback | None = None,
    forced_ids: torch.Tensor | None = None,
) -> GenerationOutput:
    """Run one batch to completion. input_ids, valid: [b, q] on the executor's device.

    ``forced_ids`` [b, f]: tokens fed one decode step each after the prefill (teacher forcing), so
    that they attend to the cache as the executor keeps it (compressed, evicted, offloaded) and not
    to the prefill's dense K,V; the first new token is then sampled from the last forced step's
    logits, never from the prefill's.

    On CUDA the next decode step is queued before the host waits for this step's tokens, so the
    device never idles between steps; elsewhere every call runs synchronously, and queuing ahead
    would only shift each step's time into the previous token's.
    """
    b = input_ids.shape[0]
    generator = make_generator(params, input_ids.device)
    mailbox = TokenMailbox(b, input_ids.device)
    lookahead = mailbox.enabled
    tokens: list[list[int]] = [[] for _ in range(b)]
    stopped = [False] * b
    step_s: list[float] = []

    start = time.perf_counter()
    logits = executor.prefill(input_ids, valid)[:, -1]  # [b, V]
    if forced_ids is not None:
        for position in range(forced_ids.shape[1]):
            logits = executor.decode(forced_ids[:, position])  # [b, V]
    ids = sample_next(logits, params, generator)  # [b]
    slot = mailbox.post(ids)
    prefill_s, last = 0.0, start

    def queue_next(current: torch.Tensor) -> tuple[torch.Tensor, int]:
        with record_function("kvpr.decode_step"):  # one step per span in a --trace
            chosen = sample_next(executor.decode(current), params, generator)
        return chosen, mailbox.post(chosen)

    for step in range(params.max_new_tokens):
        has_next = step + 1 < params.max_new_tokens
        if has_next and lookahead:  # queue the next step before the host waits for this one's tokens
            next_ids, next_slot = queue_next(ids)
        host_ids = mailbox.read(slot)  # the one wait per step: the host needs tokens to stream and stop
        now = time.perf_counter()
        if step == 0:
            prefill_s = now - start
        else:
            step_s.append(now - last)
        last = now
        for row, token in enumerate(host_ids):
            if not stopped[row]:
                tokens[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        stopped = [s or (t in eos_ids and params.stop_on_eos) for s, t in zip(stopped, host_ids)]
        if all(stopped) or not has_next:
            break  # a step queued ahead is discarded
        if not lookahead:  # synchronous devices: the step runs now and is timed with the next read
            next_ids, next_slot = queue_next(ids)
        ids, slot = next_ids, next_slot
    executor.finish()
    return GenerationOutput(
        tokens=tokens,
        finished_by_eos=stopped,
        prefill_s=prefill_s,
        step_s=step_s,
        recompute_lens=list(executor.recompute_lens),
        host_lens=list(getattr(executor, "host_lens", ())),
    )


# -- step-wise generation for a server: rows that join and leave between decode steps ---------------


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded into one block: ids and validity [k, q] on ``device``."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        valid[row, width - len(ids) :] = True
    return input_ids.to(device), valid.to(device)


def supports_row_joins(executor: object) -> bool:
    """Whether prompts may join ``executor``'s batch between decode steps: the dense latency-mode
    cache, whose rows are independent token-major slots. The cache methods and throughput mode keep
    per-layer state that one prefill builds for the whole batch, so their batches run whole."""
    return isinstance(executor, Executor)


class RowBatch:
    """A dense cache whose free rows take new prompts between decode steps (continuous batching).

    All rows share one token count ``S``. ``start`` prefills a fresh batch (rows without a prompt
    are all padding); afterwards ``join`` prefills prompts of at most ``S`` tokens on their own rows
    and writes them right-aligned into tokens ``[S - q, S)`` of rows whose request ended, which the
    other rows never see. Validity says which tokens of a row are its own::

        [0, S - q)        nothing: the row's earlier request, or padding
        [S - q, S)        the new prompt (its own left padding invalid), then each generated token

    The slot count only grows; ``reset`` empties the batch once no row is live. Rows join only
    where the host tier stores K,V and X exactly (``joins_running``): under a lossy codec a token's
    stored form depends on where it lands (a GPU slot keeps it exact), which a join would change.
    """

    def __init__(self, executor: Executor) -> None:
        if not supports_row_joins(executor):
            raise ValueError(f"{type(executor).__name__} keeps no independent rows: run it as a FixedBatch")
        self.executor = executor
        self.layout = _TierLayout(executor)
        self.joins_running = executor.storage.raw and executor.storage.x_codec is None

    @property
    def width(self) -> int:
        return self.executor.batch.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.executor.batch.valid.shape[1]

    @property
    def length(self) -> int:
        """S: tokens in every row's slots, padding included."""
        return self.executor.batch.length

    def reset(self) -> None:
        """Forget every row: the next ``start`` prefills at token 0 (the storage is reused)."""
        executor = self.executor
        executor.finish()
        executor.batch = BatchState(self.width, self.capacity, executor.device)
        self.layout.reset(executor)
        for name in ("recompute_lens", "host_lens"):
            getattr(executor, name, []).clear()

    def start(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """Prefill an empty batch: ``prompts`` on ``rows``, the other rows all padding. Returns the
        logits [k, V] after each prompt's last token."""
        assert self.length == 0, "start an empty batch (reset it first)"
        input_ids, valid = left_pad(prompts, pad_id, self.executor.device)  # [k, q]
        index = torch.tensor(list(rows), dtype=torch.long, device=self.executor.device)  # [k]
        all_ids = torch.full((self.width, input_ids.shape[1]), pad_id, dtype=torch.long, device=index.device)
        all_valid = torch.zeros_like(all_ids, dtype=torch.bool)  # [b, q]
        all_ids[index], all_valid[index] = input_ids, valid
        return self.executor.prefill(all_ids, all_valid)[index, -1]

    def fits(self, prompt_len: int) -> bool:
        """Whether a prompt may join now: it must lie within the tokens the batch already has."""
        return self.joins_running and 0 < prompt_len <= self.length

    @torch.inference_mode()
    def join(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """Prefill ``prompts`` (each ``fits``) on the free ``rows`` and place them in the last
        tokens; returns the logits [k, V] after each prompt's last token. Live rows are untouched."""
        executor = self.executor
        assert all(self.fits(len(ids)) for ids in prompts)
        # No wait for the device: the rows' GPU slots are written on the compute stream after the
        # steps queued so far, their host slots on the store stream after that compute.
        input_ids, valid = left_pad(prompts, pad_id, executor.device)  # [k, q]
        index = torch.tensor(list(rows), dtype=torch.long, device=executor.device)  # [k]
        start = self.length - input_ids.shape[1]
        model = executor.model
        positions, mask = BatchState(*input_ids.shape, executor.device).append(valid)  # [k, q], [k, 1, q, q]
        rope = model.rope(positions, executor.dtype)  # [k, q, 1, d]
        hidden = model.embed(input_ids, positions)  # [k, q, h]
        runs = row_runs(rows)
        self.layout.clear_rows(executor, index)
        for layer_index, layer in enumerate(executor.layers):  # Executor.prefill's arithmetic, on k rows
            x = layer.attn_input(hidden)  # [k, q, h]
            k, v = layer.kv_from_input(x, rope)  # [k, q, n_kv, d]
            out = attend(layer.query(x, rope), k.transpose(1, 2), v.transpose(1, 2), mask)
            tokens = (k.transpose(0, 1), v.transpose(0, 1), x.transpose(0, 1))  # [q, k, ...] each
            self.layout.write(executor, layer_index, index, runs, start, valid, *tokens)
            hidden = layer.finish(hidden, out)
        executor.batch.place(index, valid)
        return model.logits(hidden[:, -1:])[:, -1]  # [k, V]

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One decode step of every row ([b] -> logits [b, V]); free rows run on any token, unread."""
        logits = self.executor.decode(token_ids)
        for name in ("recompute_lens", "host_lens"):  # a server runs for days: keep the last step's
            del getattr(self.executor, name, [])[:-1]
        return logits

    def last_split(self) -> tuple[int, int]:
        """(l, host tokens) of the last decode step: recomputed from X, and all read from the host."""
        return self.layout.last_split(self.executor)

    def link_bytes(self) -> tuple[int, int]:
        """(host-to-device, device-to-host) bytes a decode step moves now, all layers; device-to-host
        is the new token's share of the write-back."""
        executor, storage = self.executor, self.executor.storage
        if not executor.offloaded:
            return 0, 0
        recompute_len, host_len = self.last_split()
        kv_token = sum(storage.part(name, 0)[0].nbytes for name in storage.part_names)  # all rows
        x_token = sum(storage.x_part(name, 0)[0].nbytes for name in storage.x_part_names)
        layers = storage.shape.num_layers
        return layers * (recompute_len * x_token + (host_len - recompute_len) * kv_token), layers * (kv_token + x_token)


def row_runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive rows in ``rows``: (first row, end row, position of the first in
    ``rows``). Rows 2, 3, 4, 7 give (2, 5, 0), (7, 8, 3)."""
    runs: list[tuple[int, int, int]] = []
    for position, row in enumerate(rows):
        if runs and runs[-1][1] == row:
            first, _, at = runs[-1]
            runs[-1] = (first, row + 1, at)
        else:
            runs.append((row, row + 1, position))
    return runs


def cuda_copy_2d() -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """``copy(dst, src)``: a device block [t, r, ...] into a pitched host view [t, r, ...] (rows
    ``r`` of a wider pinned tensor), as one ``cudaMemcpy2DAsync`` on the current stream; None where
    libcudart cannot be found. torch's own ``copy_`` into a non-contiguous host tensor goes through
    a pageable temporary and blocks the host."""
    path = None
    with open("/proc/self/maps") as maps:  # the libcudart torch loaded (pip wheels ship their own)
        for line in maps:
            if "libcudart.so" in line:
                path = line.split()[-1]
                break
    path = path or ctypes.util.find_library("cudart")
    if path is None:
        return None
    try:
        memcpy_2d = ctypes.CDLL(path).cudaMemcpy2DAsync
    except (OSError, AttributeError):
        return None
    size = ctypes.c_size_t
    memcpy_2d.argtypes = [ctypes.c_void_p, size, ctypes.c_void_p, size, size, size, ctypes.c_int, ctypes.c_void_p]
    memcpy_2d.restype = ctypes.c_int
    device_to_host = 2  # cudaMemcpyDeviceToHost

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        assert dst.shape == src.shape and dst.dtype == src.dtype and src.is_cuda and not dst.is_cuda
        assert dst[0].is_contiguous() and src[0].is_contiguous(), "each token's rows must be one block"
        element = dst.element_size()
        stream = torch.cuda.current_stream(src.device).cuda_stream
        status = memcpy_2d(
            dst.data_ptr(), dst.stride(0) * element, src.data_ptr(), src.stride(0) * element,
            dst[0].numel() * element, dst.shape[0], device_to_host, stream,
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {status}")

    return copy


class _HostRows:
    """Writes a join's tokens into some rows of the pinned host tier without blocking the host:
    on the overlapped executor's store stream, one pitched copy per stored part and contiguous
    run of rows (no CPU index_put, no pageable bounce), ordered like a tail flush by the
    executor's ``flushed`` event of the layer. The sequential executor copies in program order."""

    def __init__(self, executor: Any) -> None:
        self.streams = getattr(executor, "streams", None)
        self.flushed: list[Any] | None = getattr(executor, "flushed", None)
        self.copy_2d = cuda_copy_2d() if executor.device.type == "cuda" else None

    def wait_flush(self, layer: int) -> None:
        """The compute stream waits for the last write-back of ``layer`` (it reads the GPU tail)."""
        if self.streams is not None and self.flushed is not None:
            self.streams.compute_waits(self.flushed[layer])  # a flushed tail is copied before rows overwrite it

    def store(
        self, storage: Any, layer: int, runs: list[tuple[int, int, int]], start: int, *tokens: torch.Tensor
    ) -> None:
        """Host slots [start, start+t) of the rows in ``runs``: k, v [t, k, n_kv, d], x [t, k, h]
        (X only where the storage keeps it); the storage holds them as computed."""
        k, v, x = tokens
        assert storage.raw and storage.x_codec is None, "rows join only a host tier stored exactly"
        end = start + k.shape[0]
        pairs = [(storage.k(layer), k), (storage.v(layer), v)]
        if storage.store_inputs:
            pairs.append((storage.x(layer), x))
        sources = [(host, part.contiguous()) for host, part in pairs]  # [t, k, ...] on the compute stream
        streams = self.streams
        if streams is None:
            self._copy_runs(sources, runs, start, end)
            return
        with streams.on_store_after_compute():  # after the compute that made them, and every load before
            for _, source in sources:
                streams.keep_alive_for_store(source)
            self._copy_runs(sources, runs, start, end)
            streams.record_on_store(self.flushed[layer])  # type: ignore[index]  # loads of these slots wait

    def _copy_runs(
        self, sources: list[tuple[torch.Tensor, torch.Tensor]], runs: list[tuple[int, int, int]], start: int, end: int
    ) -> None:
        for host, source in sources:
            for first, last, at in runs:
                dst, src = host[start:end, first:last], source[:, at : at + last - first]  # [t, r, ...]
                if self.copy_2d is not None and src.is_cuda:
                    self.copy_2d(dst, src)
                else:
                    dst.copy_(src)


class _TierLayout:
    """Where a dense executor keeps token ``t`` of a row, for ``RowBatch`` to write rows: the two
    tiers of ``kvpr.runtime.tiers`` (a GPU prefix, the host tier, then the GPU tail)."""

    def __init__(self, executor: Any) -> None:
        self.host_rows = _HostRows(executor)

    def reset(self, executor: Any) -> None:
        executor.tiers = TierState(executor.plan)
        executor.storage.length = 0
        executor.gpu_valid.zero_()

    def clear_rows(self, executor: Any, rows: torch.Tensor) -> None:
        """Forget every GPU-tier token of ``rows`` (the host tier's validity is the batch state's)."""
        executor.gpu_valid[rows] = False

    def write(
        self,
        executor: Any,
        layer: int,
        rows: torch.Tensor,
        runs: list[tuple[int, int, int]],
        start: int,
        valid: torch.Tensor,
        *tokens: torch.Tensor,
    ) -> None:
        """Tokens [start, start+q) of ``rows`` [k] (``runs``: the same as ``row_runs``): k, v
        [q, k, n_kv, d], x [q, k, h]; valid [k, q]."""
        k, v, x = tokens
        self.host_rows.wait_flush(layer)
        tiers, plan = executor.tiers, executor.plan
        end, host_end = start + k.shape[0], tiers.prefix + tiers.host
        gpu_k, gpu_v = executor.gpu_keys(layer)
        pieces = [  # (first token, end token, GPU slot of the first token or None: host)
            (start, min(end, tiers.prefix), start),
            (max(start, tiers.prefix), min(end, host_end), None),
            (max(start, host_end), end, plan.prefix_cap + max(start, host_end) - host_end),
        ]
        for first, last, slot in pieces:
            if last <= first:
                continue
            block = slice(first - start, last - start)
            if slot is None:
                self.host_rows.store(executor.storage, layer, runs, first - tiers.prefix, k[block], v[block], x[block])
                continue
            gpu_k[slot : slot + last - first, rows] = k[block]
            gpu_v[slot : slot + last - first, rows] = v[block]
            executor.gpu_valid[rows, slot : slot + last - first] = valid[:, block]
            tail = slot - plan.prefix_cap
            if tail >= 0 and executor.tail_x.shape[1]:  # X of the tail, for its flush to the host
                executor.tail_x[layer, tail : tail + last - first, rows] = x[block]

    def last_split(self, executor: Any) -> tuple[int, int]:
        recompute_len = executor.recompute_lens[-1] if executor.recompute_lens else 0
        return recompute_len, executor.host_lens[-1] if executor.host_lens else 0


class FixedBatch:
    """A batch prefilled whole, for caches that cannot take a row mid-run (the cache methods keep
    per-layer state one prefill builds; throughput mode keeps per-lane tiers): rows that finish early
    idle, and new prompts wait until the batch is done. ``executor`` has exactly ``width`` rows."""

    joins_running = False

    def __init__(self, executor: Any, width: int) -> None:
        self.executor = executor
        self.width = width
        self.length = 0

    def start(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """Prefill the whole batch once: ``rows`` are 0..width-1."""
        assert self.length == 0 and list(rows) == list(range(self.width)), "a FixedBatch is prefilled once, whole"
        input_ids, valid = left_pad(prompts, pad_id, self.executor.device)  # [k, q]
        self.length = input_ids.shape[1]
        return self.executor.prefill(input_ids, valid)[:, -1]  # [k, V]

    def fits(self, prompt_len: int) -> bool:
        return False

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.length += 1
        logits = self.executor.decode(token_ids)
        del self.executor.recompute_lens[:-1]
        return logits  # type: ignore[no-any-return]

    def last_split(self) -> tuple[int, int]:
        lens = self.executor.recompute_lens
        return (lens[-1] if lens else 0), 0

    def link_bytes(self) -> tuple[int, int]:
        """(host-to-device, device-to-host) bytes of the last step where the executor counts them
        (the compressed caches count what they copy; throughput mode does not: zero)."""
        step_bytes = getattr(self.executor, "step_bytes", None)
        return (step_bytes()[1], 0) if step_bytes is not None else (0, 0)
