"""Model files as a newcomer meets them: damaged safetensors and GGUF files, GGUF architectures kvpr
cannot run, and the converted GGUF copy's precision and cache key. Every problem is one line, exit 2."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kvpr.api import LLM
from kvpr.cli import main
from kvpr.config import EngineConfig, RuntimeConfig
from kvpr.errors import KvprError
from kvpr.models.loader import cache_root, gguf_to_safetensors

gguf = pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Conversions go to this test's own cache directory, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return cache_root()


def write_gguf(path: Path, arch: str = "llama", kind: str = "F16", layers: int = 2) -> Path:
    """A tiny random GGUF as llama.cpp writes one: header, hyperparameters, a byte-level BPE
    tokenizer of single characters, and the weights (matrices in ``kind``, norms in F32)."""
    h, f, heads, kv_heads, vocab = 64, 96, 4, 2, 96
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(f)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 33 + vocab - 4)] + ["ab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    quant = gguf.GGMLQuantizationType[kind]

    def tensor(name: str, shape: tuple[int, ...]) -> None:
        values = (rng.standard_normal(shape) * 0.2).astype(np.float32)  # [n_out, n_in] as in torch
        if len(shape) == 1 or kind in ("F32", "F16"):
            writer.add_tensor(name, values.astype(np.float16) if len(shape) > 1 and kind == "F16" else values)
        else:  # the quantised bytes, [n_out, bytes per row]
            writer.add_tensor(name, gguf.quants.quantize(values, quant), raw_dtype=quant)

    d = h // heads
    tensor("token_embd.weight", (vocab, h))
    tensor("output_norm.weight", (h,))
    tensor("output.weight", (vocab, h))
    for layer in range(layers):
        for name, shape in (
            ("attn_norm", (h,)),
            ("ffn_norm", (h,)),
            ("attn_q", (heads * d, h)),
            ("attn_k", (kv_heads * d, h)),
            ("attn_v", (kv_heads * d, h)),
            ("attn_output", (h, heads * d)),
            ("ffn_gate", (f, h)),
            ("ffn_up", (f, h)),
            ("ffn_down", (h, f)),
        ):
            tensor(f"blk.{layer}.{name}.weight", shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()  # drop what building the test's checkpoint printed
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvpr: error: ") and "Traceback" not in captured.err
    return lines[0]


def _cpu(model: Path) -> EngineConfig:
    return EngineConfig(model=str(model), runtime=RuntimeConfig(device="cpu", dtype="float32"))


def _stored_dtypes(directory: Path) -> set[torch.dtype]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {handle.get_tensor(name).dtype for name in handle.keys()}


# ---------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_is_one_line(damage: str, tiny_checkpoint, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama-gqa"), model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 4096, "empty": b""}[damage])
    line = _one_error_line(capsys, ["generate", "--prompt", "hi", "--model", str(model), "--device", "cpu"])
    assert f"{weights} is not a valid safetensors file (truncated or corrupt" in line and "re-copy" in line
    with pytest.raises(KvprError, match="not a valid safetensors file"):
        LLM(_cpu(model))


@pytest.mark.parametrize("damage", ["garbage", "empty", "cut in the header", "cut in the weights", "one byte short"])
def test_damaged_gguf_is_one_line(damage: str, tmp_path: Path, capsys, private_cache: Path) -> None:
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    cut = {
        "garbage": b"\x13" * 5000,
        "empty": b"",
        "cut in the header": good[:3000],
        "cut in the weights": good[: int(len(good) * 0.6)],
        "one byte short": good[:-1],
    }[damage]
    path = tmp_path / "model.gguf"
    path.write_bytes(cut)
    line = _one_error_line(capsys, ["generate", "--prompt", "hi", "--model", str(path), "--device", "cpu"])
    assert f"{path} is not a valid GGUF file (truncated or corrupt" in line
    with pytest.raises(KvprError, match="not a valid GGUF file"):
        LLM(_cpu(path))
    assert not (private_cache / "models").exists() or not any((private_cache / "models").iterdir())


def test_unsupported_gguf_architecture_is_refused_from_the_header(tmp_path: Path, capsys, monkeypatch) -> None:
    """Gemma 3 was converted for 47 s before the refusal: now the header decides, nothing is converted."""
    import transformers

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GGUF was converted before its architecture was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    path = write_gguf(tmp_path / "gemma.gguf", arch="gemma3", layers=8)
    start = time.perf_counter()
    with pytest.raises(KvprError, match=r"holds a 'gemma3' model; kvpr runs the GGUF architectures llama"):
        LLM(_cpu(path))
    assert time.perf_counter() - start < 2.0
    assert "gemma3" in _one_error_line(capsys, ["bench", "--model", str(path), "--device", "cpu"])
    assert not (cache_root() / "models").exists()


# ---------------------------------------------------------------- the converted copy


@pytest.mark.parametrize(
    ("kind", "stored"), [("F16", torch.float16), ("Q8_0", torch.float16), ("BF16", torch.bfloat16)]
)
def test_gguf_copy_keeps_the_files_precision(kind: str, stored: torch.dtype, tmp_path: Path) -> None:
    """A 16-bit run stores the file's precision class (a 1.1 GB Q4 file became 6.7 GB as fp32);
    an fp32 run gets its own fp32 copy, and a config-only read takes whichever copy exists."""
    path = write_gguf(tmp_path / f"tiny-{kind}.gguf", kind=kind)
    small = gguf_to_safetensors(path, torch.float16)
    assert _stored_dtypes(small) == {stored}
    assert gguf_to_safetensors(path, torch.bfloat16) == small  # any 16-bit run shares it
    assert gguf_to_safetensors(path, None) == small
    full = gguf_to_safetensors(path, torch.float32)
    assert full != small and _stored_dtypes(full) == {torch.float32}
    weight_bytes = [(d / "model.safetensors").stat().st_size for d in (small, full)]
    assert weight_bytes[0] < 0.55 * weight_bytes[1]


def test_fp32_copy_is_exact_where_fp16_is_not(tmp_path: Path) -> None:
    """Why an fp32 run keeps an fp32 copy: dequantised Q8_0 weights (d * q, d in fp16) are not fp16
    numbers, and the CPU fp32 path must equal transformers' own GGUF load bit for bit."""
    from transformers import AutoModelForCausalLM

    path = write_gguf(tmp_path / "tiny-q8.gguf", kind="Q8_0")
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(_cpu(path))
    assert _stored_dtypes(gguf_to_safetensors(path, torch.float32)) == {torch.float32}
    weight = reference.model.layers[0].mlp.up_proj.weight
    assert torch.equal(llm.model.get_parameter("model.layers.0.mlp.up_proj.weight"), weight)
    assert not torch.equal(weight.half().float(), weight)  # an fp16 copy would round it
    ids = torch.tensor([[5, 17, 42, 9, 60]])
    executor = llm.make_executor(1, 8)
    logits = executor.prefill(ids, torch.ones_like(ids, dtype=torch.bool), all_logits=True)
    with torch.no_grad():
        assert torch.equal(logits, reference(input_ids=ids).logits)


def test_conversion_cache_is_keyed_by_transformers_version(tmp_path: Path, monkeypatch) -> None:
    """Under transformers 5.2 the converted tokenizer adds a start token and ends on id 1: a copy
    made under another version must not be reused."""
    import transformers

    path = write_gguf(tmp_path / "tiny.gguf")
    first = gguf_to_safetensors(path, torch.float16)
    made = (first / "model.safetensors").stat().st_mtime_ns
    assert gguf_to_safetensors(path, torch.float16) == first  # same version: reused
    monkeypatch.setattr(transformers, "__version__", "5.2.0")
    other = gguf_to_safetensors(path, torch.float16)
    assert other != first and (other / "model.safetensors").is_file() and (other / "tokenizer.json").is_file()
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(first.parents[2]))
    assert gguf_to_safetensors(path, torch.float16) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == made  # not converted again
