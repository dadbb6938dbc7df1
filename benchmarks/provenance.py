"""Where a result came from: the header every benchmark writes above its rows.

A figure is only worth quoting if a reader can rebuild the code that produced it, so a result names
its commit (full hash) and whether the tree had changes outside ``benchmarks/results/``, and a
script refuses to write one from a dirty tree or an unknown commit unless ``--allow-dirty`` is
given (then recorded). The device machine gets a copy of the tree without a usable ``.git``: there
the commit and dirty state come from ``KVPR_COMMIT`` and ``KVPR_DIRTY``, which
``python3 benchmarks/provenance.py`` prints on the checkout for the command line.

    from provenance import add_provenance_args, results_header
    header = results_header(args.allow_dirty, peers=("flexgen",))   # before the run: refuses early
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENV_COMMIT, ENV_DIRTY = "KVPR_COMMIT", "KVPR_DIRTY"
RESULTS_DIR = "benchmarks/results"  # a run writes here: its own outputs never make the tree dirty
_TRUE, _FALSE = ("1", "true", "yes", "dirty"), ("0", "false", "no", "clean")


class ProvenanceError(RuntimeError):
    """The result could not be tied to a clean commit (the message names the fix)."""


@dataclass(frozen=True)
class SourceState:
    """The code a run measures: commit (None: unknown), dirty (None: unknown), and how it was read."""

    commit: str | None
    dirty: bool | None
    source: str  # "git", "env" or "unknown"


def _git(repo: Path, *args: str) -> str | None:
    """stdout of ``git -C repo args``, or None where git or the repository is not usable."""
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _env_dirty(value: str | None) -> bool | None:
    if value is None:
        return None
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ProvenanceError(f"{ENV_DIRTY}={value!r}: give 0 (clean) or 1 (dirty)")


def source_state(repo: Path = REPO, env: dict[str, str] | None = None) -> SourceState:
    """The commit and dirty state from git where git works; else from KVPR_COMMIT / KVPR_DIRTY.

    Where both are present they must agree (the env names the commit the tree was copied from).
    """
    env = dict(os.environ) if env is None else env
    env_commit = env.get(ENV_COMMIT, "").strip() or None
    env_dirty = _env_dirty(env.get(ENV_DIRTY))
    head = _git(repo, "rev-parse", "--verify", "HEAD")
    # git "works" only in the top level of this repository: a copy nested in another one is not ours
    top = _git(repo, "rev-parse", "--show-toplevel")
    if head is not None and top is not None and Path(top.strip()).resolve() == repo.resolve():
        commit = head.strip()
        if env_commit is not None and not (commit.startswith(env_commit) or env_commit.startswith(commit)):
            raise ProvenanceError(
                f"{ENV_COMMIT}={env_commit} but git says HEAD is {commit}: unset {ENV_COMMIT} or check out that commit"
            )
        status = _git(repo, "status", "--porcelain", "--", ".", f":(exclude){RESULTS_DIR}")
        return SourceState(commit, None if status is None else bool(status.strip()), "git")
    if env_commit is not None:
        return SourceState(env_commit, env_dirty, "env")
    return SourceState(None, None, "unknown")


def device_state() -> dict[str, Any]:
    """The accelerator and its driver: nvidia-smi, else the CUDA driver API; a CPU has no driver."""
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "driver": None, "cuda": None}
    driver = None
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=30)
        driver = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    if driver is None:  # the CUDA version the driver supports, e.g. 13000 -> "cuda-driver-api 13.0"
        version = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()
        driver = f"cuda-driver-api {version // 1000}.{version % 1000 // 10}" if version else None
    return {"device": torch.cuda.get_device_name(0), "driver": driver, "cuda": torch.version.cuda}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def results_header(
    allow_dirty: bool,
    peers: Sequence[str] = (),
    repo: Path = REPO,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The fields every results JSON starts with; call it before the run so a refusal costs nothing.

    Raises ProvenanceError for a dirty tree, an unknown dirty state or an unknown commit, unless
    ``allow_dirty`` (then ``"allow_dirty": true`` is in the header). ``peers``: packages whose
    versions the rows depend on (e.g. ``flexgen``), recorded under ``peers``.
    """
    import torch

    state = source_state(repo, env)
    if not allow_dirty:
        if state.commit is None:
            raise ProvenanceError(
                f"no commit: not a git checkout and {ENV_COMMIT} is unset; run with "
                f"$(python3 benchmarks/provenance.py) from the checkout, or pass --allow-dirty"
            )
        if state.dirty is None:
            raise ProvenanceError(f"unknown whether {state.commit[:12]} was clean: set {ENV_DIRTY}=0 or 1")
        if state.dirty:
            raise ProvenanceError(
                f"the tree has changes against {state.commit[:12]} (git status, outside {RESULTS_DIR}): "
                "commit them first, or pass --allow-dirty"
            )
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "commit": state.commit or "unknown",
        "dirty": state.dirty,
        "allow_dirty": allow_dirty,
        "commit_source": state.source,
        **device_state(),
        "torch": str(torch.__version__),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "peers": {name: _version(name) for name in peers},
        "date": now.strftime("%Y%m%d"),
        "created": now.isoformat(timespec="seconds"),
    }


def add_provenance_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help=f"write results from a dirty tree or an unknown commit (recorded in the JSON); the commit "
        f"comes from git, or from {ENV_COMMIT} and {ENV_DIRTY} where the tree has no usable .git",
    )


def header_or_exit(allow_dirty: bool, peers: Sequence[str] = ()) -> dict[str, Any]:
    """``results_header`` for a script's main: a refusal is one line and exit status 2."""
    try:
        return results_header(allow_dirty, peers)
    except ProvenanceError as problem:
        print(f"refused: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> int:
    """Print ``KVPR_COMMIT=<hash> KVPR_DIRTY=<0|1>`` of this checkout, for a device command line."""
    state = source_state(REPO, env={})
    if state.commit is None or state.dirty is None:
        print("not a usable git checkout", file=sys.stderr)
        return 2
    print(f"{ENV_COMMIT}={state.commit} {ENV_DIRTY}={int(state.dirty)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
