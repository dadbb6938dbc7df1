"""What the CLI checks before any work: flag values, output paths and prompt text.

A run that would fail at its end (an unwritable report, a trace nowhere) fails here in one line
instead, before a model loads; argparse's own errors become one line too.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from kvpr.errors import KvprError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are KvprErrors (one line, exit 2 through ``main``), not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise KvprError(f"{message} (see {self.prog} --help)")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` states each default, except where the help text already does or there is none to
    state (None: chosen at run time, False: a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action) or text


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum`` (a count of 0 would otherwise run as
    something else, or nothing)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            message = f"{text!r} is not a whole number: give a whole number >= {minimum}"
            raise argparse.ArgumentTypeError(message) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: give a whole number >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a number > 0 (a memory size in GiB)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give one > 0") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number: give one > 0")
    return value


def check_output_path(path: str | os.PathLike[str], what: str, directory: bool = False) -> Path:
    """The path a run will write to, checked before the run starts.

    A file needs an existing, writable parent directory and must not be a directory itself; a
    ``directory`` (created with its parents when missing) must not be a file, and its nearest
    existing ancestor must be a writable directory.
    Raises:
        KvprError: naming ``what`` (the flag), the path and the fix.
    """
    target = Path(path).expanduser()
    if directory:
        if target.exists() and not target.is_dir():
            raise KvprError(f"{what} {path} is a file, not a directory: give a directory (created if missing)")
        existing = next(p for p in (target, *target.parents) if p.exists())
        if not existing.is_dir():
            raise KvprError(f"{what} {path}: {existing} is a file, not a directory: choose another path")
        _check_writable(existing, what, path)
        return target
    if target.is_dir():
        raise KvprError(f"{what} {path} is a directory: give a file name in it, e.g. {target / 'out.json'}")
    parent = target.parent
    if not parent.exists():
        raise KvprError(f"{what} {path}: directory {parent} does not exist: create it first or choose another path")
    if not parent.is_dir():
        raise KvprError(f"{what} {path}: {parent} is a file, not a directory: choose another path")
    _check_writable(parent, what, path)
    if target.exists() and not os.access(target, os.W_OK):
        raise KvprError(f"{what} {path} exists and is not writable: choose another path or change its permissions")
    return target


def _check_writable(directory: Path, what: str, path: str | os.PathLike[str]) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise KvprError(f"{what} {path}: directory {directory} is not writable: choose a directory you can write to")


def check_prompt_text(prompts: Sequence[str], flag: str) -> None:
    """Reject prompts that are not UTF-8 text. Python decodes such command-line bytes to lone
    surrogates, which the tokenizer and the terminal cannot handle."""
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            byte = prompt[err.start].encode("utf-8", "surrogateescape")
            raise KvprError(
                f"{flag} is not valid UTF-8 (byte 0x{byte.hex()} at character {err.start}): "
                "pass UTF-8 text (convert it, e.g. with iconv -t UTF-8)"
            ) from None


def package_version() -> str:
    """kvpr's installed version (``--version``)."""
    try:
        return importlib.metadata.version("kvpr")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def format_rate(value: float, unit: str) -> str:
    """A rate with an SI prefix and about three significant digits (13.7 GFLOP/s, 21.9 MB/s), so a
    slow device's rates never print as 0.0."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            scaled = value / scale
            digits = 2 if scaled < 10 else 1 if scaled < 100 else 0
            return f"{scaled:.{digits}f} {prefix}{unit}"
    return f"{value:.3g} {unit}"
