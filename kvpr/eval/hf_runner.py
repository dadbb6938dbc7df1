"""transformers' model on the engine's own weights, with a transformers cache, under kvpr's protocol.

Two uses, both rows of ``kvpr eval`` measured on the same items and windows as the engine's rows:

- peers: transformers' ``QuantizedCache`` with the optimum-quanto backend at its defaults (4 or 2
  bits, groups of 64 along the last axis, i.e. per token and head for K and V, a 128-token
  full-precision residual): ``hf-quanto-int4``, ``hf-quanto-int2``;
- kvpr's KIVI specs with the ``@hf`` suffix (``kivi4:rotate=v@hf``), to check this runner against
  the engine, which runs every KIVI spec itself: :class:`KiviLayer` keeps the engine's
  ``KiviCache`` policy (fp16 residual, ``residual`` tokens quantised at a time, padding zeroed,
  prefill attention exact) and calls the same codec.

``answer`` and ``score`` follow ``LLM.answer`` and ``LLM.score`` step for step: the context is
prefilled, the question fed one decode step per token, greedy answers sampled from decode steps.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvpr.compress.methods import KiviConfig, method_config, parse_codec_spec
from kvpr.config import KIVI_METHODS, SamplingParams
from kvpr.errors import KvprError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kvpr.api import LLM

HF_SUFFIX = "@hf"  # a KIVI spec run by this runner even where the engine runs it
QUANTO_PEERS: dict[str, int] = {"hf-quanto-int4": 4, "hf-quanto-int2": 2}  # name -> bits
QUANTO_GROUP, QUANTO_RESIDUAL = 64, 128  # transformers' QuantizedCache defaults


def runs_here(spec: str) -> bool:
    """Whether ``spec`` is measured by this runner (a quanto peer, or a KIVI spec with the ``@hf``
    suffix) rather than by the engine."""
    if spec in QUANTO_PEERS:
        return True
    return spec.endswith(HF_SUFFIX) and spec.partition(":")[0].removesuffix(HF_SUFFIX) in KIVI_METHODS


def recent_tokens(spec: str) -> int:
    """The full-precision window of a spec this runner measures (for the needle guard W)."""
    if spec in QUANTO_PEERS:
        return QUANTO_RESIDUAL
    name, params = parse_codec_spec(spec.removesuffix(HF_SUFFIX))
    return int(method_config(name, params).residual)


@dataclass
class Answer:
    """What ``run_items`` reads of a completion."""

    token_ids: list[int]
    text: str


def kivi_layer_class() -> type:
    """One layer's cache for transformers (a ``DynamicLayer``; transformers is imported here): kvpr's
    KIVI codec under the engine's ``KiviCache`` policy. ``keys`` and ``values`` [b, n_kv, s, d] hold
    what decode attention reads: the decoded blocks, then the fp16 residual."""
    from transformers.cache_utils import DynamicLayer

    class KiviLayer(DynamicLayer):
        is_croppable = False

        def __init__(self, config: KiviConfig, valid: torch.Tensor) -> None:
            super().__init__()
            self.config, self.codec, self.valid = config, config.codec(), valid  # valid: bool [b, t] of the prefill

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            b, n, _, d = key_states.shape
            self.dtype = key_states.dtype
            empty = key_states.new_zeros(0, b, n, d, dtype=torch.float16)
            self.res_k, self.res_v = empty, empty  # [r, b, n_kv, d] fp16
            self.blocks_k = self.blocks_v = key_states.new_zeros(b, n, 0, d)  # decoded blocks [b, n_kv, s, d]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            prefill = not self.is_initialized
            if prefill:
                self.lazy_initialization(key_states, value_states)
            k, v = key_states.permute(2, 0, 1, 3), value_states.permute(2, 0, 1, 3)  # [t, b, n_kv, d]
            if prefill:  # padding never widens a range (as KiviCache)
                keep = self.valid.T[:, :, None, None]
                k, v = torch.where(keep, k, 0), torch.where(keep, v, 0)
            all_k = torch.cat([self.res_k, k.to(torch.float16)])
            all_v = torch.cat([self.res_v, v.to(torch.float16)])
            full = all_k.shape[0] // self.config.residual * self.config.residual
            if full:
                dk, dv = self.codec.decode(self.codec.encode(all_k[:full], all_v[:full]), self.dtype)
                self.blocks_k = torch.cat([self.blocks_k, dk.permute(1, 2, 0, 3)], dim=2)
                self.blocks_v = torch.cat([self.blocks_v, dv.permute(1, 2, 0, 3)], dim=2)
            self.res_k, self.res_v = all_k[full:], all_v[full:]
            self.keys = torch.cat([self.blocks_k, self.res_k.to(self.dtype).permute(1, 2, 0, 3)], dim=2)
            self.values = torch.cat([self.blocks_v, self.res_v.to(self.dtype).permute(1, 2, 0, 3)], dim=2)
            if prefill:  # prefill attention is dense and exact
                return key_states, value_states
            return self.keys, self.values

    return KiviLayer


def quanto_layer_class() -> type:
    """transformers' ``QuantoQuantizedLayer`` (what ``QuantizedCache("quanto", ...)`` builds per layer)
    that keeps the dequantized copy of its quantized states until they are quantized anew. transformers
    dequantizes the unchanged states again at every decode step (quanto's CPU unpacking made a
    SmolLM2 step 20x slower than the fp16 model); the copy is the same tensor, so answers and scores
    are unchanged and only the measurement gets faster."""
    from transformers.cache_utils import QuantoQuantizedLayer

    class MemoQuantoLayer(QuantoQuantizedLayer):
        def _dequantize(self, qtensor: Any) -> torch.Tensor:
            memo = getattr(self, "_memo", {})
            if id(qtensor) in memo and memo[id(qtensor)][0] is qtensor:
                return memo[id(qtensor)][1]
            current = {
                id(q): (q, dq) for q, dq in memo.values() if q is self._quantized_keys or q is self._quantized_values
            }
            current[id(qtensor)] = (qtensor, qtensor.dequantize())
            self._memo = current
            return current[id(qtensor)][1]

    return MemoQuantoLayer


class TransformersRunner:
    """transformers' model for ``llm``'s weights with a cache per batch (see the module docstring).

    Offers what ``kvpr.eval`` calls on an engine: ``tokenizer``, ``encode_split``, ``answer``,
    ``score``, ``footprint``; ``params`` describe the cache for the report.
    """

    def __init__(self, llm: LLM, spec: str) -> None:
        if not runs_here(spec):
            raise KvprError(f"{spec} is not a transformers-runner config: use hf-quanto-int4|int2 or a KIVI spec + @hf")
        self.llm, self.spec = llm, spec
        self.tokenizer, self.model_config, self.name = llm.tokenizer, llm.model_config, llm.name
        self.device, self.dtype = llm.device, llm.dtype
        if spec in QUANTO_PEERS:
            _require_quanto()
            self.kivi: KiviConfig | None = None
            self.params: dict[str, Any] = {
                "backend": "quanto",
                "nbits": QUANTO_PEERS[spec],
                "axis_key": 0,
                "axis_value": 0,
                "q_group_size": QUANTO_GROUP,
                "residual_length": QUANTO_RESIDUAL,
            }
        else:
            name, params = parse_codec_spec(spec.removesuffix(HF_SUFFIX))
            self.kivi = method_config(name, params)
            self.params = {"method": name, **dict(params)}
        self.model = _hf_model(llm)

    # -- sizes ---------------------------------------------------------------------------------
    def bytes_per_token(self) -> float:
        """Stored bytes of one quantised token, K and V of all layers (codes, fp16 scales and zeros)."""
        m = self.model_config
        if self.kivi is not None:
            return m.num_layers * self.kivi.codec().bytes_per_token(1, m.num_kv_heads, m.head_dim)
        bits = QUANTO_PEERS[self.spec]
        per_head = m.head_dim * bits / 8 + 4 * m.head_dim / QUANTO_GROUP  # per token and head: codes + scale, shift
        return 2 * m.num_layers * m.num_kv_heads * per_head

    def footprint(self, context_len: int) -> tuple[float, float]:
        """(stored, read) bytes per token of a ``context_len`` context: whole residual windows
        quantised, the rest fp16 (as ``CacheMethod.footprint`` counts KIVI)."""
        residual = self.kivi.residual if self.kivi is not None else QUANTO_RESIDUAL
        quantised = context_len // residual * residual
        fp16 = 2 * self.model_config.num_layers * self.model_config.kv_size * 2
        stored = (quantised * self.bytes_per_token() + (context_len - quantised) * fp16) / context_len
        return stored, stored

    # -- the protocol ----------------------------------------------------------------------------
    def encode_split(self, contexts: Sequence[str], questions: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        return self.llm.encode_split(contexts, questions)

    def _cache(self, valid: torch.Tensor) -> Any:
        from transformers.cache_utils import Cache

        if self.kivi is None:
            layer = quanto_layer_class()
            return Cache(layers=[layer(nbits=QUANTO_PEERS[self.spec]) for _ in range(self.model_config.num_layers)])
        layer = kivi_layer_class()
        return Cache(layers=[layer(self.kivi, valid) for _ in range(self.model_config.num_layers)])

    @torch.inference_mode()
    def _prefill(self, rows: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prefill: (cache, last logits [b, V], attention mask [b, q], next positions [b])."""
        input_ids, valid = self.llm._pad(rows)  # the engine's own padding
        cache = self._cache(valid)
        mask = valid.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        return cache, out.logits[:, -1].float(), mask, positions[:, -1] + 1

    def _step(self, cache: Any, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids[:, None], attention_mask=mask, position_ids=position[:, None], past_key_values=cache
        )
        return out.logits[:, -1].float()  # [b, V]

    @torch.inference_mode()
    def answer(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], params: SamplingParams) -> list[Answer]:
        """Greedy answers as ``LLM.answer`` gives them (questions equalised the same way)."""
        if params.temperature != 0.0:
            raise KvprError("the transformers runner answers greedily: use temperature 0")
        width = max(len(question) for _, question in pairs)
        joined = [list(map(int, context)) + list(map(int, question)) for context, question in pairs]
        cache, logits, mask, position = self._prefill([ids[:-width] for ids in joined])
        forced = torch.tensor([ids[-width:] for ids in joined], dtype=torch.long, device=self.device)  # [b, f]
        ones = mask.new_ones(mask.shape[0], 1)
        for column in range(width):
            mask = torch.cat([mask, ones], dim=1)
            logits = self._step(cache, forced[:, column], mask, position)
            position = position + 1
        eos = self.model_config.eos_token_ids
        tokens: list[list[int]] = [[] for _ in pairs]
        stopped = [False] * len(pairs)
        for step in range(params.max_new_tokens):
            ids = logits.argmax(dim=-1)  # [b]
            for row, token in enumerate(ids.tolist()):
                if not stopped[row]:
                    tokens[row].append(token)
                    stopped[row] = token in eos and params.stop_on_eos
            if all(stopped) or step + 1 == params.max_new_tokens:
                break
            mask = torch.cat([mask, ones], dim=1)
            logits = self._step(cache, ids, mask, position)
            position = position + 1
        return [Answer(row, self.llm.decode_text(row)) for row in tokens]

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]], prefix_len: int) -> torch.Tensor:
        """Log-probabilities [b, n - prefix_len] as ``LLM.score`` gives them."""
        ids = torch.tensor([list(seq) for seq in sequences], dtype=torch.long, device=self.device)  # [b, n]
        cache, logits, mask, position = self._prefill([list(seq[:prefix_len]) for seq in sequences])
        scores = [torch.log_softmax(logits, dim=-1).gather(1, ids[:, prefix_len : prefix_len + 1])]
        ones = mask.new_ones(mask.shape[0], 1)
        for at in range(prefix_len, ids.shape[1] - 1):
            mask = torch.cat([mask, ones], dim=1)
            logits = self._step(cache, ids[:, at], mask, position)
            position = position + 1
            scores.append(torch.log_softmax(logits, dim=-1).gather(1, ids[:, at + 1 : at + 2]))
        return torch.cat(scores, dim=1).cpu()


def quanto_available() -> bool:
    """optimum-quanto is installed (the peers' backend)."""
    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def _require_quanto() -> None:
    if not quanto_available():
        raise KvprError("the hf-quanto peers need optimum-quanto: pip install optimum-quanto==0.2.7")


def _hf_model(llm: LLM) -> torch.nn.Module:
    """transformers' model of the engine's checkpoint directory (for a GGUF model: the safetensors
    copy the engine converted and loaded), in the engine's dtype on its device."""
    from transformers import AutoModelForCausalLM

    from kvpr.models.loader import resolve_source

    source = resolve_source(llm.config.model, llm.config.dummy_weights, llm.dtype)
    if source.directory is None:
        raise KvprError(f"model {llm.name} has no checkpoint directory for transformers to load")
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=llm.dtype)
    return model.to(llm.device).eval()
