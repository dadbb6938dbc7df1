"""Text to token ids and back with the checkpoint's own tokenizer files (never a hub download): shared
by ``LLM`` and by the server's HTTP side, which tokenizes without loading the weights."""

from __future__ import annotations

from typing import Any

from kvpr.errors import KvprError


def tokenize(tokenizer: Any, prompt: str, row: int = 0) -> list[int]:
    """One prompt's ids (``row``: its place, for the error). Text that already starts with the BOS
    token (as a chat template writes it) gets no second one."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise KvprError(f"prompt {row} is not valid UTF-8 text at character {err.start}: pass UTF-8 text") from None
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos and prompt.startswith(bos):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def load_tokenizer(directory: Any) -> Any:
    """The checkpoint's own tokenizer files (never a hub download), or None when there are none."""
    files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((directory / name).is_file() for name in files):
        return None  # before importing transformers, which takes seconds
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise KvprError(f"cannot load the tokenizer in {directory}: {str(err).splitlines()[0]}") from None
