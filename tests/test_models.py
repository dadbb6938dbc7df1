"""kvpr's own model code against transformers' logits on the same weights (CPU, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CONFIGS, cpu_llm, make_hf_model, make_llm
from kvpr.errors import KvprError

DECODE_STEPS = 16
# (offload, recompute, overlap, GPU-resident tokens)
PLACEMENTS = [
    ("none", "off", True, 0),
    ("cpu", 0.5, True, 0),
    ("cpu", 1.0, False, 0),
    ("cpu", "off", False, 0),
    ("cpu", 0.5, True, 4),
]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _batch(vocab: int, lengths: list[int], extra: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts [b, q] followed by ``extra`` forced tokens, and the mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra
    ids = torch.randint(3, vocab - 1, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, max(lengths) - length :] = True
        ids[row, : max(lengths) - length] = 0
    return ids, mask


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
@pytest.mark.parametrize("offload,recompute,overlap,resident", PLACEMENTS)
def test_against_hf_logits(tiny_checkpoint, family: str, offload: str, recompute, overlap: bool, resident: int) -> None:
    """Prefill logits and 16 teacher-forced decode steps equal transformers' (max abs diff < 1e-4)."""
    hf = make_hf_model(family)
    llm = make_llm(tiny_checkpoint(family), offload, recompute, overlap, gpu_resident=resident)
    lengths = [7, 3, 11]
    ids, mask = _batch(llm.model_config.vocab_size, lengths, DECODE_STEPS)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long(), position_ids=_positions(mask)).logits
    prompt_len = max(lengths)
    executor = llm.make_executor(len(lengths), ids.shape[1])
    prefill = executor.prefill(ids[:, :prompt_len], mask[:, :prompt_len], all_logits=True)
    valid = mask[:, :prompt_len]
    diff = (prefill - expected[:, :prompt_len])[valid].abs().max().item()
    assert diff < 1e-4, f"prefill logits differ by {diff}"
    for step in range(DECODE_STEPS):
        position = prompt_len + step
        logits = executor.decode(ids[:, position])
        diff = (logits - expected[:, position]).abs().max().item()
        assert diff < 1e-4, f"decode step {step} logits differ by {diff}"
    assert executor.tiers.length == ids.shape[1]  # every token placed, on the GPU tier or the host's
    assert executor.storage.length == (executor.tiers.host if executor.offloaded else ids.shape[1])
    executor.storage.check_integrity()


def test_sharded_and_bin_checkpoints_load_identically(tiny_checkpoint, tmp_path: Path) -> None:
    """One checkpoint saved as single safetensors, sharded safetensors and .bin gives equal logits."""
    single = tiny_checkpoint("llama-gqa")
    hf = make_hf_model("llama-gqa")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((single / "config.json").read_text())
    state = load_file(str(single / "model.safetensors"))
    names = sorted(state)
    torch.save({n: state[n] for n in names[: len(names) // 2]}, binary / "pytorch_model-00001-of-00002.bin")
    torch.save({n: state[n] for n in names[len(names) // 2 :]}, binary / "pytorch_model-00002-of-00002.bin")
    ids = torch.tensor([[5, 9, 17, 3, 44]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    results = []
    for directory in (single, sharded, binary):
        executor = cpu_llm(directory).make_executor(1, 8)
        results.append(executor.prefill(ids, mask, all_logits=True))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_checkpoint_mismatch_is_reported(tiny_checkpoint, tmp_path: Path) -> None:
    source = tiny_checkpoint("opt")
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    with pytest.raises(KvprError, match="1 missing|missing"):
        cpu_llm(broken)


@pytest.mark.parametrize("name", ["llama-3-8b", "llama-3.1-8b", "mistral-7b", "qwen2-7b"])
def test_builtin_rope_frequencies_match_transformers(name: str) -> None:
    """A built-in configuration's RoPE (theta, and Llama 3.1's llama3 scaling to 128K positions) gives the
    inverse frequencies transformers computes from the same config.json."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from kvpr.models.common import rope_inv_freq
    from kvpr.models.registry import BUILTIN_CONFIGS, builtin_config

    fields = dict(BUILTIN_CONFIGS[name])
    hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    model = builtin_config(name)
    if params.get("rope_type", "default") == "default":  # transformers 5 keeps no init function for it
        theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
        expected = 1.0 / theta ** (torch.arange(0, model.head_dim, 2, dtype=torch.float64) / model.head_dim)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(model.rope, model.head_dim).float(), expected.float(), rtol=1e-6, atol=0)
    assert model.max_position == fields["max_position_embeddings"]
