"""benchmarks/results.py: its tables from a small real measurement, and the docs/RESULTS.md block it rewrites."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("results", REPO / "benchmarks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_names_its_options():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "results.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--output", "--update-docs", "--chunks"):
        assert flag in done.stdout


def test_speed_table_from_a_small_real_measurement(results, short_text):
    kernel = results.bench_kernel.measure(total_mb=2, dim=256, rank=8, repeats=1, threads=2, model_figures=False)
    evaluator = results.bench_evaluator.measure(text=str(short_text), chunks=1, ctx=64, threads=2)
    assert kernel["theta_GBps"] > 0 and evaluator["ratio"] > 0
    env = results.environment()
    block = results.render(env, None, results.render_speed(evaluator, kernel))
    assert env["cpu"] in block and env["isa"] in block and env["llama_cpp_python"] in block
    assert re.search(r"\d{4}-\d\d-\d\d", block)
    rows = [line for line in block.splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # header, rule, evaluator, kernel
    assert f"{evaluator['ratio']:.2f} ({evaluator['evaluator_tokens_per_second']:.0f} vs" in rows[2]
    assert f"{kernel['theta_GBps']:.1f} GB/s = {kernel['ratio']:.2f} of one core's" in rows[3]


def test_backend_table_shows_the_difference_from_the_merge(results):
    rows = [{"theta": "none (Q4_0 base)", "merged": None, "lora": 29.6488, "shim": 29.6488},
            {"theta": "residual rank 8 (lora_b F16)", "merged": 28.6730, "lora": 28.8166, "shim": 28.7976}]
    text = results.render_backends(rows, 8, "wiki.test.raw")
    assert "| none (Q4_0 base) | - | 29.6488 | 29.6488 |" in text
    assert "| residual rank 8 (lora_b F16) | 28.6730 | 28.8166 (+0.50 %) | 28.7976 (+0.43 %) |" in text


def test_results_block_is_replaced_and_nothing_else(results):
    assert results.RESULTS_DOC == REPO / "docs" / "RESULTS.md"
    doc = results.RESULTS_DOC.read_text()
    assert doc.count(results.RESULTS_BEGIN) == 1 and doc.count(results.RESULTS_END) == 1
    assert results.RESULTS_BEGIN not in (REPO / "README.md").read_text()  # one home for the regenerated tables
    new = results.replace_block(doc, "NEW TABLES\n")
    before, after = doc.split(results.RESULTS_BEGIN)[0], doc.split(results.RESULTS_END)[1]
    assert new == before + results.RESULTS_BEGIN + "\nNEW TABLES\n" + results.RESULTS_END + after
    assert results.replace_block(new, "NEW TABLES\n") == new
    with pytest.raises(SystemExit, match="no <!-- results:begin -->"):
        results.replace_block("no markers here", "x")
