"""The user's face: ``LLM(EngineConfig(...)).generate(prompts, SamplingParams(...))``.

The CLI and Python users share this one code path: load once, then build a cache and an executor
sized for each batch, run the token loop, and decode text.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvpr.cache.codec import make_x_codec
from kvpr.cache.storage import CacheShape, KVStorage
from kvpr.config import (
    THROUGHPUT_NUM_CHUNKS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    Offload,
    RuntimeConfig,
    SamplingParams,
)
from kvpr.device import element_size, host_memory_limit, pin_host_memory, resolve_device, resolve_dtype
from kvpr.errors import KvprError
from kvpr.models.loader import build_model, init_dummy_weights, load_weights, resolve_source
from kvpr.outputs import Completion, RunStats, run_stats
from kvpr.parallel import WeightShard, check_supported, parallelize, rank_config, setup
from kvpr.placement import (
    Target,
    cache_bytes,
    check_before_loading,
    check_block_fits,
    check_cache_fits,
    disk_tier_dir,
    make_codec,
    recompute_fraction,
    tier_plan,
)
from kvpr.runtime.compressed import CacheMethod, CompressedExecutor
from kvpr.runtime.executor import Executor
from kvpr.runtime.generation import TokenCallback, generate_tokens
from kvpr.runtime.latency import OverlappedExecutor
from kvpr.runtime.reference import SequentialExecutor
from kvpr.runtime.throughput import ThroughputExecutor
from kvpr.runtime.weights import LayerWeights
from kvpr.scheduler.policy import make_split_policy
from kvpr.tokens import load_tokenizer, tokenize


class LLM:
    """A loaded model plus the placement and runtime settings to serve it."""

    def __init__(self, config: EngineConfig, batch_size: int = 1, max_len: int = 1) -> None:
        """``batch_size`` rows of ``max_len`` slots: the largest batch the caller means to run. Its
        cache and staging are checked with the weights against free memory before anything is
        allocated, so an impossible run fails in one line, not after building gigabytes of weights
        (every batch is checked again when it runs)."""
        self.config = config
        check_supported(config)  # tensor parallelism's limits, before anything is loaded
        self.device = resolve_device(config.runtime.device)
        self.dtype = resolve_dtype(config.runtime.dtype, self.device)
        host_memory_limit(config.runtime.host_memory_gib)  # refuses a budget above the machine's memory
        source = resolve_source(config.model, config.dummy_weights, self.dtype)
        num_ranks = config.runtime.tensor_parallel
        # With tensor parallelism, this rank's share of the heads and MLP: what the cache, the
        # placement checks and the scheduler size from (kvpr.parallel).
        self.model_config: ModelConfig = rank_config(source.config, num_ranks)
        self.tp, self.device = setup(num_ranks, self.device)
        self.name = source.name
        self.codec = make_codec(config.cache, self.model_config)  # rejects a bad --kv-codec before the weights load
        self._check_compile()
        self.x_codec = make_x_codec(config.cache.x_codec, self.model_config.hidden_size)
        self.model = build_model(self.model_config)  # on the meta device: no memory yet
        shard = None
        if self.tp is not None:
            parallelize(self.model, self.tp)
            shard = WeightShard.of(build_model(source.config), self.model, self.tp)
        self.layer_weights = self._plan_weights(batch_size, max_len)  # throughput mode: weights on three tiers
        place = self.layer_weights.place if self.layer_weights else None
        if config.dummy_weights:
            init_dummy_weights(self.model, self.device, self.dtype, seed=0, place=place, shard=shard)
        else:
            device = torch.device("cpu") if place else self.device
            load_weights(self.model, source, device, self.dtype, place, shard)
        self.model.eval()
        self.model_dir = source.directory  # config, weights and tokenizer files (None: a built-in config)
        self.tokenizer = load_tokenizer(source.directory) if source.directory else None
        self.last_stats: RunStats | None = None

    def _check_compile(self) -> None:
        if not self.config.runtime.compile:
            return
        if self.device.type != "cuda":
            raise KvprError("--compile needs a CUDA device (its fused kernels are Triton's): drop it here")
        if self.config.cache.kv_codec != "kvo":
            codec = self.config.cache.kv_codec
            raise KvprError(f"--compile fuses KVO's decode kernels: use it with --kv-codec kvo, not {codec}")

    def _plan_weights(self, batch_size: int, max_len: int) -> LayerWeights | None:
        """Check that the weights and a first batch's cache fit where the placement puts them; in
        throughput mode, lay out the GPU, CPU and disk shares (``LayerWeights``). Allocates nothing
        before the check (a throughput run's host and disk shares are allocated after it)."""
        throughput, weight_bytes = self.config.throughput, self._weight_bytes()
        check_before_loading(self._target(), throughput, batch_size, max_len, weight_bytes, self._offload_dir)
        if throughput is None:
            return None
        pin = throughput.pin_weight and pin_host_memory(self.device)
        weights = LayerWeights(
            self.model,
            throughput.placement,
            self.device,
            self.dtype,
            pin,
            self._offload_dir(),
            throughput.compress_weight,
        )
        weights.allocate()
        return weights

    def _offload_dir(self) -> Path | None:
        """This engine's disk-tier directory, made at the first call (None: no disk tier)."""
        if getattr(self, "_disk_dir", None) is None:
            self._disk_dir = disk_tier_dir(self.config.throughput, self)
        return self._disk_dir

    def with_placement(self, cache: CacheConfig, runtime: RuntimeConfig | None = None) -> "LLM":
        """The same loaded weights under another cache placement / runtime (no reload).

        The device and dtype stay those the weights were loaded with.
        """
        clone = copy.copy(self)
        runtime = runtime or self.config.runtime
        fixed = self.config.runtime  # the weights were loaded for these
        runtime = dataclasses.replace(
            runtime, device=fixed.device, dtype=fixed.dtype, tensor_parallel=fixed.tensor_parallel
        )
        clone.config = self.config.replace(cache=cache, runtime=runtime)
        check_supported(clone.config)
        clone.codec = make_codec(cache, self.model_config)
        clone._check_compile()
        clone.x_codec = make_x_codec(cache.x_codec, self.model_config.hidden_size)
        clone.last_stats = None
        return clone

    @classmethod
    def from_pretrained(cls, model: str | None = None, **overrides: Any) -> "LLM":
        return cls(EngineConfig(model=model, **overrides))

    # -- tokenization ----------------------------------------------------------------------

    def encode(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Strings go through the model's tokenizer; lists of ids pass through. One str (or one flat
        list of ids) is one prompt: iterating a str would make a prompt of each character."""
        if isinstance(prompts, str) or (prompts and all(isinstance(p, int) for p in prompts)):
            prompts = [prompts]  # type: ignore[assignment]
        if not prompts:
            raise KvprError("no prompts given: pass at least one prompt")
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise KvprError(
                    f"model {self.name} has no tokenizer: pass token ids, or a model directory with tokenizer files"
                )
            return [tokenize(self.tokenizer, p, row) for row, p in enumerate(prompts)]  # type: ignore[arg-type]
        return [list(map(int, p)) for p in prompts]  # type: ignore[arg-type]

    def format_prompt(self, prompt: str, chat_template: bool = True) -> str:
        """``prompt`` as a user turn in the model's chat template, ready for its reply (an instruct
        model answers turns; raw text it may just continue). Unchanged when ``chat_template`` is
        False or the tokenizer has no template."""
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        if not chat_template or not template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(  # type: ignore[union-attr]
            messages, add_generation_prompt=True, tokenize=False
        )

    def decode_text(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        """Generate for a batch of prompts (left-padded into one batch); a single str is one prompt
        (a list of one Completion)."""
        params = params or SamplingParams()
        return self._run(self.encode(prompts), params, on_token)

    def encode_split(self, contexts: Sequence[str], questions: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(context ids, question ids) of each pair, cut from the tokens of ``context + question``
        (so the model sees exactly the joint tokenization); the cut moves left where a token spans
        the boundary."""
        if len(contexts) != len(questions):
            raise KvprError(f"{len(contexts)} contexts but {len(questions)} questions: give one question each")
        pairs = []
        joints = self.encode([context + question for context, question in zip(contexts, questions)])
        for context, joint in zip(self.encode(list(contexts)), joints):
            cut = next((i for i, (a, b) in enumerate(zip(context, joint)) if a != b), min(len(context), len(joint)))
            pairs.append((joint[:cut], joint[cut:]))
        return pairs

    def answer(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], params: SamplingParams | None = None
    ) -> list[Completion]:
        """Answer each (context ids, question ids) pair from the cache as the placement keeps it.

        The contexts are prefilled (a cache method compresses, evicts or packs them there); the
        questions then run through that cache one decode step per token, and the answer is sampled
        from the last question token's logits. So no logit of an answer comes from attention over
        the uncompressed context. Questions of one batch are made equally long by moving the end of
        a shorter row's context into its question: more tokens go through the cache, never fewer.
        """
        params = params or SamplingParams()
        if not pairs:
            raise KvprError("no prompts given: pass at least one (context, question) pair")
        width = max(len(question) for _, question in pairs)
        if width == 0:
            raise KvprError("every question is empty: give each pair at least one question token")
        joined = [list(map(int, context)) + list(map(int, question)) for context, question in pairs]
        if any(len(ids) <= width for ids in joined):
            raise KvprError(f"a context is too short to leave a token for prefill beside a {width}-token question")
        self._check_vocabulary(joined)  # the forced question tokens as well as the prefilled ones
        return self._run([ids[:-width] for ids in joined], params, None, [ids[-width:] for ids in joined])

    def _run(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        on_token: TokenCallback | None,
        forced: list[list[int]] | None = None,
    ) -> list[Completion]:
        """The token loop over blocks of rows (throughput mode) or one batch (latency mode)."""
        block = self.config.throughput.block_size if self.config.throughput else len(prompt_ids)
        num_forced = len(forced[0]) if forced else 0
        completions: list[Completion] = []
        block_stats: list[RunStats] = []
        for first in range(0, len(prompt_ids), block):
            rows = prompt_ids[first : first + block]
            input_ids, valid = self._pad(rows)
            forced_ids = None
            if forced:
                forced_ids = torch.tensor(forced[first : first + block], dtype=torch.long, device=self.device)  # [b, f]
            executor = self.make_executor(len(rows), input_ids.shape[1] + num_forced + params.max_new_tokens)
            callback = None if on_token is None else (lambda row, token, first=first: on_token(first + row, token))
            eos = self.model_config.eos_token_ids
            try:
                output = generate_tokens(executor, input_ids, valid, params, eos, callback, forced_ids)
            finally:
                executor.close()  # throughput mode's disk files go with the run, not with the executor
            block_stats.append(run_stats(output, input_ids.shape))
            prompts = [ids + (forced[first + row] if forced else []) for row, ids in enumerate(rows)]
            completions += [
                Completion(
                    prompt_token_ids=ids,
                    token_ids=tokens,
                    text=self.decode_text(tokens),
                    finish_reason="eos" if by_eos else "length",
                )
                for ids, tokens, by_eos in zip(prompts, output.tokens, output.finished_by_eos)
            ]
        self.last_stats = RunStats.combine(block_stats)
        return completions

    def _pad(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad to one batch: ids and validity [b, q] on the compute device."""
        if any(len(ids) == 0 for ids in prompt_ids):
            raise KvprError("a prompt is empty after tokenization: give every prompt at least one token")
        self._check_vocabulary(prompt_ids)
        vocab = self.model_config.vocab_size
        width = max(len(ids) for ids in prompt_ids)
        pad = self.model_config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < vocab else 0
        input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        valid = torch.zeros((len(prompt_ids), width), dtype=torch.bool)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            valid[row, width - len(ids) :] = True
        return input_ids.to(self.device), valid.to(self.device)

    def _check_vocabulary(self, token_ids: Sequence[Sequence[int]]) -> None:
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for ids in token_ids for t in ids):
            raise KvprError(f"a prompt token id lies outside the vocabulary [0, {vocab})")

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]], prefix_len: int) -> torch.Tensor:
        """Log-probabilities [b, n - prefix_len] of each sequence's tokens after ``prefix_len``.

        The prefix is prefilled; the rest is fed one token per decode step (teacher forcing), so
        the cache placement, the split and any codec shape the result exactly as in generation.
        All sequences must have the same length n.
        """
        lengths = {len(seq) for seq in sequences}
        if len(lengths) != 1:
            raise KvprError("score needs sequences of one length: cut them to a common window")
        length = lengths.pop()
        if not 0 < prefix_len < length:
            raise KvprError(f"prefix_len={prefix_len} must lie in [1, {length - 1}]")
        ids = torch.tensor([list(seq) for seq in sequences], dtype=torch.long, device=self.device)  # [b, n]
        executor = self.make_executor(ids.shape[0], length)
        try:
            logits = executor.prefill(ids[:, :prefix_len], torch.ones_like(ids[:, :prefix_len], dtype=torch.bool))
            scores = [torch.log_softmax(logits[:, -1].float(), dim=-1).gather(1, ids[:, prefix_len : prefix_len + 1])]
            for position in range(prefix_len, length - 1):
                step_logits = executor.decode(ids[:, position]).float()  # [b, V]
                scores.append(torch.log_softmax(step_logits, dim=-1).gather(1, ids[:, position + 1 : position + 2]))
        finally:
            executor.close()
        return torch.cat(scores, dim=1).cpu()  # [b, n - prefix_len]

    def make_executor(self, batch_size: int, max_len: int) -> Executor:
        """A fresh cache and executor for one batch of ``batch_size`` rows and ``max_len`` slots."""
        if self.config.throughput is not None:
            return self._throughput_executor(batch_size, max_len)
        shape = self.check_fits(batch_size, max_len)
        cache, runtime, target = self.config.cache, self.config.runtime, self._target()
        if isinstance(self.codec, CacheMethod):
            offloaded = cache.offload is Offload.CPU  # KVO, KIVI and the baselines: a compressed cache per layer
            pin = offloaded and pin_host_memory(self.device)
            compile_ = self.config.runtime.compile
            return CompressedExecutor(self.model, self.codec, shape, self.device, offloaded, pin, compile_)  # type: ignore[return-value]
        plan = tier_plan(target, shape)
        offloaded = plan is not None
        storage = KVStorage(
            dataclasses.replace(shape, max_len=plan.host_slots) if offloaded else shape,  # type: ignore[union-attr]
            torch.device("cpu") if offloaded else self.device,
            pin=offloaded and pin_host_memory(self.device),
            store_inputs=offloaded and target.stores_inputs(),
            codec=self.codec,
            x_codec=self.x_codec,
        )
        gpu_tokens = plan.gpu_slots if offloaded else 0  # type: ignore[union-attr]
        split = make_split_policy(
            cache, runtime, self.model_config, batch_size, self.device, self.dtype, self.codec, self.x_codec, gpu_tokens
        )
        if runtime.overlap:
            return OverlappedExecutor(
                self.model, storage, self.device, offloaded, split, plan, runtime.slot_tokens, runtime.step_graphs
            )
        return SequentialExecutor(self.model, storage, self.device, offloaded, split, plan)

    def _throughput_executor(self, batch_size: int, max_len: int) -> Executor:
        """One block of the block schedule: the cache split over GPU, CPU and disk by --percent."""
        throughput = self.config.throughput
        assert throughput is not None and self.layer_weights is not None
        self._check_throughput_fits(batch_size, max_len)
        target, runtime = self._target(), self.config.runtime
        fraction = recompute_fraction(target, throughput, runtime.profile_path)
        stores_inputs, num_chunks = target.stores_inputs(), runtime.num_chunks or THROUGHPUT_NUM_CHUNKS
        return ThroughputExecutor(  # type: ignore[return-value]
            self.model, self.layer_weights, throughput, batch_size, max_len, self.device, self.dtype,
            fraction, stores_inputs, num_chunks, self._offload_dir(), self.codec, self.x_codec,  # type: ignore[arg-type]
        )  # fmt: skip

    # -- placement: every batch sized by kvpr.placement before anything is allocated ---------

    def _target(self) -> Target:
        """This engine as kvpr.placement sizes it (the placement and budget of ``with_placement``'s too)."""
        cache, runtime = self.config.cache, self.config.runtime
        return Target(
            self.model_config, self.name, self.device, self.dtype, cache, self.codec, self.x_codec,
            runtime.host_memory_gib, runtime.gpu_memory_gib, runtime.flush_block,
        )  # fmt: skip

    def cache_bytes(self, batch_size: int, max_len: int) -> tuple[int, int]:
        """(GPU, host) bytes a latency-mode batch's cache would take under this placement: the GPU
        tier, rings and host tier the memory check counts (the weights not included)."""
        shape = CacheShape.for_model(self.model_config, batch_size, max_len, self.dtype)
        device_bytes, host_bytes, _ = cache_bytes(self._target(), shape)
        return device_bytes, host_bytes

    def check_fits(self, batch_size: int, max_len: int, weights_loaded: bool = True) -> CacheShape:
        """Raise a KvprError, before allocating anything, if this batch cannot run here
        (``weights_loaded=False``: counting the weights too, before they load)."""
        shape = CacheShape.for_model(self.model_config, batch_size, max_len, self.dtype)
        if self.config.throughput is not None:
            self._check_throughput_fits(batch_size, max_len, weights_loaded)
            return shape
        check_cache_fits(self._target(), shape, self._weight_bytes(), weights_loaded)
        return shape

    def _weight_bytes(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) * element_size(self.dtype)

    def _check_throughput_fits(self, batch_size: int, max_len: int, weights_loaded: bool = True) -> None:
        """``check_block_fits`` of a block of ``batch_size`` rows (``weights_loaded=False``: with the
        weights, still to load)."""
        throughput = self.config.throughput
        assert throughput is not None
        # LayerWeights.start makes the two GPU layer buffers at the first block and keeps them.
        buffers_made = weights_loaded and getattr(self.layer_weights, "_gpu", None) is not None
        target, disk_dir = self._target(), self._offload_dir  # the directory is made only for a disk share
        check_block_fits(target, throughput, batch_size, max_len, weights_loaded, buffers_made, disk_dir)
