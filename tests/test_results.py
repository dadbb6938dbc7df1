"""The committed results stand behind what they claim (CPU, reads files only).

- Every timed row of a latency JSON has the floor of its own plan and is not more than 2% below it
  (a row below its floor is a bug in the floor).
- Every results JSON (latency, throughput, accuracy and ``kvpr sim``'s) names a commit in this
  repository's history and was written from a clean tree, or says ``allow_dirty``, and carries every
  field of benchmarks/provenance.py's header (device, driver, versions, date).
- Every results file README.md cites exists (lines under a heading named "History" excepted).
Files under ``benchmarks/results/history/`` are the record of older runs and are not checked.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FLOOR_TOLERANCE = 0.02  # a timed median may sit this far below its floor (noise of the peak rates)
# sim-: kvpr sim --results; tiered-, serve-, kvo-prefill-, kvo-encode-: bench_tiered, bench_serve,
# bench_kvo_prefill, bench_kvo_encode
RESULT_PREFIXES = ("latency-", "tiered-", "throughput-", "accuracy-", "sim-", "serve-", "kvo-prefill-", "kvo-encode-")
# Prefixes of results whose commit and dirty state are not checked: none, every results JSON outside
# history/ is (accuracy reports carry benchmarks/provenance.py's header since issue 12).
COMMIT_CHECK_EXEMPT: tuple[str, ...] = ()
# A results file named in the README: a path under results/, or a bare name such as
# latency-paper-NVIDIA_H200-20261202.json; "..." or "*" stand for any characters.
CITED = re.compile(
    r"(?:benchmarks/)?results/[\w.*/\-]+?\.json(?:\.gz)?"
    r"|(?<![\w/.-])(?:latency|throughput|accuracy|profile|trace|sim)-[\w.*\-]*?\.json(?:\.gz)?"
)


def _current(prefixes: tuple[str, ...]) -> list[Path]:
    """Results JSONs outside history/ whose names start with one of ``prefixes``."""
    return sorted(path for path in RESULTS.glob("*.json") if path.name.startswith(prefixes))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _git_works() -> bool:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.returncode == 0


def _commit_exists(commit: str) -> bool:
    command = ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"]
    found = re.fullmatch(r"[0-9a-f]{7,40}", commit) is not None
    return found and subprocess.run(command, capture_output=True).returncode == 0


def _timed_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows with a measured decode time: not skipped, not the cost model's (untimed) floor row."""
    return [
        row
        for row in result.get("rows", [])  # a capacity-only result has none
        if row.get("decode_ms_per_token") and not row.get("skipped") and row.get("timed", True)
        and row.get("system") != "floor"
    ]  # fmt: skip


def floor_problems(name: str, result: dict[str, Any]) -> list[str]:
    """Timed rows without a floor of their own plan, or more than FLOOR_TOLERANCE below it."""
    problems = []
    for row in _timed_rows(result):
        where = f"{name}: {row['model']} b={row['batch_size']} s={row['prompt_len']} {row['system']}"
        if not row.get("floor_ms") or not row.get("floor_kind"):
            problems.append(f"{where} has no floor_ms/floor_kind ({row.get('floor_missing', 'not computed')})")
        elif row["decode_ms_per_token"] < (1 - FLOOR_TOLERANCE) * row["floor_ms"]:
            problems.append(
                f"{where}: {row['decode_ms_per_token']:.1f} ms is more than {FLOOR_TOLERANCE:.0%} below its floor "
                f"{row['floor_ms']:.1f} ms: the floor is wrong"
            )
    return problems


@functools.cache
def header_fields() -> tuple[str, ...]:
    """The fields benchmarks/provenance.py's ``results_header`` writes (asked of it, not copied here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import provenance
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return tuple(provenance.results_header(allow_dirty=True, env={}))


def header_problems(name: str, result: dict[str, Any]) -> list[str]:
    """Header fields the result lacks (it was not written through ``provenance.results_header``)."""
    missing = [field for field in header_fields() if field not in result]
    return (
        [f"{name}: no {', '.join(missing)} in its header: write it with provenance.results_header"] if missing else []
    )


def provenance_problems(name: str, result: dict[str, Any]) -> list[str]:
    """A commit not in this history (each of a merged result's), or a dirty tree without allow_dirty."""
    problems = []
    for commit in (c.strip() for c in str(result.get("commit", "")).split(",")):  # merged runs list theirs
        if not _commit_exists(commit):
            problems.append(f"{name}: commit {commit!r} is not in this repository's history")
    if result.get("dirty") is not False and result.get("allow_dirty") is not True:
        problems.append(f"{name}: dirty={result.get('dirty')!r} without allow_dirty: re-run from a clean commit")
    return problems


@pytest.mark.parametrize("path", _current(("latency-", "tiered-")), ids=lambda p: p.name)
def test_latency_rows_are_not_below_their_own_floor(path: Path) -> None:
    assert not floor_problems(path.name, _load(path))


@pytest.mark.parametrize("path", _current(RESULT_PREFIXES), ids=lambda p: p.name)
def test_results_name_a_clean_commit_of_this_history(path: Path) -> None:
    if path.name.startswith(COMMIT_CHECK_EXEMPT):
        pytest.skip(f"{path.name}: commit check not yet enabled for {COMMIT_CHECK_EXEMPT}")
    if not _git_works():
        pytest.skip("no git history here to check commits against")
    assert not provenance_problems(path.name, _load(path))


@pytest.mark.parametrize("path", _current(RESULT_PREFIXES), ids=lambda p: p.name)
def test_results_carry_the_provenance_header(path: Path) -> None:
    assert not header_problems(path.name, _load(path))


def test_the_checks_themselves() -> None:
    row = {"model": "m", "batch_size": 1, "prompt_len": 8, "system": "kvpr-auto", "decode_ms_per_token": 97.0}
    floor_row = {**row, "system": "floor", "timed": False, "floor_ms": 500.0, "floor_kind": "predicted-fp16-plan"}
    ok = {"rows": [{**row, "floor_ms": 98.0, "floor_kind": "plan"}, floor_row, {**row, "skipped": "OOM"}]}
    assert floor_problems("r", ok) == []
    header = dict.fromkeys(header_fields())
    assert {"commit", "dirty", "device", "driver", "torch", "transformers", "python", "date"} <= set(header)
    assert header_problems("r", header) == []
    assert (
        "no device, torch" in header_problems("r", {k: v for k, v in header.items() if k not in ("device", "torch")})[0]
    )
    assert "below its floor" in floor_problems("r", {"rows": [{**row, "floor_ms": 100.0, "floor_kind": "plan"}]})[0]
    assert "no floor_ms" in floor_problems("r", {"rows": [row]})[0]
    if not _git_works():
        pytest.skip("no git history here")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance_problems("r", {"commit": head, "dirty": False}) == []
    assert provenance_problems("r", {"commit": f"{head[:7]},{head}", "dirty": True, "allow_dirty": True}) == []
    assert len(provenance_problems("r", {"commit": "unknown", "dirty": None})) == 2
    assert "dirty=True" in provenance_problems("r", {"commit": head, "dirty": True})[0]


def readme_citations(text: str) -> list[tuple[int, str]]:
    """(line number, cited name) of every results file the README names outside a "History" section
    (a heading whose text contains "History", down to the next heading of the same or a higher level)."""
    cited, history_level = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        heading = re.match(r"(#+)\s+(.*)", line)
        if heading:
            level = len(heading.group(1))
            if history_level and level <= history_level:
                history_level = 0
            if "history" in heading.group(2).lower():
                history_level = level
            continue
        if not history_level:
            cited += [(number, match.group(0)) for match in CITED.finditer(line)]
    return cited


def cited_path_exists(name: str) -> bool:
    """Whether the cited name (bare names live in benchmarks/results/; "..." and "*" are wildcards)
    matches at least one file."""
    relative = name.removeprefix("benchmarks/").removeprefix("results/")
    pattern = relative.replace("...", "*")
    return any(RESULTS.glob(pattern))


def test_readme_citations_parser() -> None:
    text = "\n".join(
        [
            "# kvpr",
            "See `benchmarks/results/latency-a.json` and `latency-b-...json`.",
            "## History",
            "Old: `latency-old.json`",
            "### detail",
            "`throughput-older.json`",
            "## Accuracy",
            "`accuracy-c.json`, results/history/latency-d.json",
        ]
    )
    assert [name for _, name in readme_citations(text)] == [
        "benchmarks/results/latency-a.json",
        "latency-b-...json",
        "accuracy-c.json",
        "results/history/latency-d.json",
    ]


def test_every_results_file_the_readme_cites_exists() -> None:
    missing = [
        f"README.md:{number}: {name}"
        for number, name in readme_citations((ROOT / "README.md").read_text())
        if not cited_path_exists(name)
    ]
    assert not missing, "README cites results files that do not exist:\n" + "\n".join(missing)
