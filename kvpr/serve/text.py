"""One choice's text as its tokens arrive: incremental detokenization and stop sequences.

Decoding only a short window of recent tokens each time (as vLLM does) keeps a long answer linear
in its length; a character split across tokens is held until it is complete, and text that could
still become a stop sequence is held until it cannot.
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"  # what a tokenizer decodes a partial UTF-8 sequence to


class TextStream:
    """Text of the tokens pushed so far, cut before the first stop sequence.

    ``push`` one token at a time; ``delta`` returns the text not yet handed out (minus what a stop
    sequence may still claim); ``stopped`` turns true at the token completing a stop sequence, and
    ``num_tokens`` counts the tokens up to it (the usage a client is billed).
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0  # tokens[_prefix:_read] decode to text already taken
        self._read = 0
        self._emitted = 0

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def _decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)  # type: ignore[no-any-return]

    def push(self, token: int) -> None:
        """Add one generated token (ignored once a stop sequence was reached)."""
        if self.stopped:
            return
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            searched = max(0, len(self.text) - self.hold)
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)
            self._find_stop(searched)

    def finish(self) -> None:
        """The last token arrived: take the whole text (a trailing partial character included)."""
        if self.stopped:
            return
        whole = self._decode(self.tokens)
        if whole.startswith(self.text[: self._emitted]):
            searched = max(0, min(len(self.text), len(whole)) - self.hold)
            self.text = whole
            self._find_stop(searched)

    def _find_stop(self, searched: int) -> None:
        hits = [index for index in (self.text.find(stop, searched) for stop in self.stops) if index >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet; while more tokens may come, the last characters that could
        begin a stop sequence stay back."""
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self.hold)
        piece = self.text[self._emitted : end]
        self._emitted = end
        return piece
