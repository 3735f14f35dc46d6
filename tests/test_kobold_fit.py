"""nkat kobold --fit: its memory arithmetic against what llama.cpp itself allocates, and the whole
command on the embedded model: a mix within the budget that loads and generates, its .kcpps (no
LoRA), its reuse by a second run, and one-line refusals when the memory is too small."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from nkat_gguf.errors import UserError
from nkat_gguf.integrations.kobold import fit
from nkat_gguf.recipe.recipe_file import read_recipe


def _logged_mib(records, pattern):
    text = "".join(t for _, t in records)
    return float(re.search(pattern, text).group(1))


def test_kv_cache_and_buffers_equal_what_llama_cpp_allocates(reference_model):
    import llama_cpp

    from nkat_gguf.runtime.llama_log import captured_llama_log

    with captured_llama_log() as records:
        model = llama_cpp.Llama(str(reference_model), n_ctx=256, n_threads=1, verbose=True)
    del model
    kv = _logged_mib(records, r"KV buffer size =\s+([\d.]+) MiB")
    compute = _logged_mib(records, r"compute buffer size =\s+([\d.]+) MiB")
    assert round(fit.kv_cache_bytes(reference_model, 256) / fit.MiB, 2) == kv  # llama.cpp prints 2 decimals
    logits = fit.logits_bytes(reference_model, 256)
    assert logits == 49152 * 256 * 4
    assert logits <= compute * fit.MiB <= logits + fit.COMPUTE_MARGIN


def test_the_budget_is_what_is_left(reference_model):
    free = 4096 * fit.MiB
    plan = fit.plan_fit(reference_model, 4096, free)
    assert plan.kv_cache_bytes == 30 * 4096 * 3 * (64 + 64) * 2  # SmolLM2-135M: 30 blocks, 3 KV heads of 64
    assert plan.budget_bytes == free - plan.kv_cache_bytes - plan.buffers_bytes - int(free * fit.HEADROOM)
    assert "MiB for the model" in plan.reason() and plan.to_dict()["budget_bytes"] == plan.budget_bytes
    # a longer context leaves less for the model
    assert fit.plan_fit(reference_model, 8192, free).budget_bytes < plan.budget_bytes


def test_no_room_is_a_user_error(reference_model):
    with pytest.raises(UserError, match="no room for a model"):
        fit.plan_fit(reference_model, 8192, 200 * fit.MiB)


def test_this_machine_reports_its_free_memory():
    assert fit.available_ram() > 0


# ---------------------------------------------------------------- nkat kobold --fit, end to end

# A small mix keeps this fast: 16 sampled rows per tensor, four candidate types, no probe files.
FIT_TYPES = "Q4_0,Q5_0,Q8_0,Q2_K"
FIT_CTX = 512


def free_for_budget(model, budget: int, n_ctx: int = FIT_CTX) -> int:
    """Whole MiB of free memory whose plan leaves at least `budget` bytes for the model."""
    need = budget + fit.kv_cache_bytes(model, n_ctx) + fit.logits_bytes(model, n_ctx) + fit.COMPUTE_MARGIN
    return -(-int(need / (1 - fit.HEADROOM)) // fit.MiB) + 1


def fit_args(reference, imatrix, out, memory_mib, *extra):
    return ["--fit", "--reference", reference, "--imatrix", imatrix, "--fit-output", out,
            "--fit-memory", f"{memory_mib}M", "--context-size", FIT_CTX, "--fit-chunks", 0, "--fit-rows", 16,
            "--fit-types", FIT_TYPES, "--json", *extra]


@pytest.fixture(scope="module")
def ref_imatrix(tmp_path_factory, reference_model):
    """A real imatrix of the reference: 2 chunks x 128 tokens of WikiText-2 valid."""
    from nkat_gguf.formats.defaults import find_calibration_text
    from nkat_gguf.formats.imatrix import write_imatrix
    from nkat_gguf.measure.ppl import read_text
    from nkat_gguf.runtime.activation_stats import collect

    stats, facts = collect(str(reference_model), read_text(find_calibration_text()), 2, 128, None, False, True)
    return write_imatrix(tmp_path_factory.mktemp("imat") / "ref.imatrix", stats, chunks=facts["chunks"],
                         chunk_size=128)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, reference_model, ref_imatrix):
    """One --fit --register run against a KoboldCpp launcher excerpt (tests/test_kobold.py's), with the
    free memory set so the budget lies 10 MiB below the reference's size (above its smallest mix)."""
    from test_kobold import make_launcher

    from nkat_gguf.cli import main

    tmp = tmp_path_factory.mktemp("fit")
    launcher = make_launcher(tmp / "kc", "new")
    memory = free_for_budget(reference_model, reference_model.stat().st_size - 10 * fit.MiB)
    out, admindir = tmp / "out" / "smol fit.gguf", tmp / "admin"
    out.parent.mkdir()
    argv = ["kobold", *map(str, fit_args(reference_model, ref_imatrix, out, memory, "--koboldcpp", launcher,
                                         "--backend", "cpu", "--register", "--admindir", admindir))]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return {"result": json.loads(stdout.getvalue()), "out": out, "admindir": admindir, "memory": memory,
            "launcher": launcher, "mtime": out.stat().st_mtime_ns, "inode": out.stat().st_ino}


def test_fit_writes_a_mix_within_the_budget(fitted, reference_model):
    from nkat_gguf.recipe.layout import tensor_types

    chosen = fitted["result"]["fit"]
    plan = fit.plan_fit(reference_model, FIT_CTX, fitted["memory"] * fit.MiB)
    assert chosen["plan"]["budget_bytes"] == plan.budget_bytes
    out = fitted["out"]
    assert chosen["mixed"] is True and chosen["reused"] is False and chosen["file"] == str(out)
    assert chosen["file_bytes"] == out.stat().st_size <= plan.budget_bytes < reference_model.stat().st_size
    written = Counter(t for n, t in tensor_types(out).items() if n in read_recipe(out.with_suffix(".recipe.txt")))
    assert written == Counter(chosen["type_counts"]) and set(written) <= set(FIT_TYPES.split(","))
    assert len(written) >= 2  # a real mix at this budget


def test_fitted_file_loads_and_generates(fitted):
    import llama_cpp

    model = llama_cpp.Llama(str(fitted["out"]), n_ctx=128, n_threads=2, verbose=False)
    text = model("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert text.strip()


def test_the_kcpps_names_the_fitted_file_and_no_lora(fitted):
    from test_kobold import help_options

    written = sorted(fitted["admindir"].iterdir())
    assert [p.name for p in written] == ["smol fit.kcpps"]
    assert fitted["result"]["registered"] == [str(written[0])]
    config = json.loads(written[0].read_text(encoding="utf-8"))
    accepted = {o.replace("-", "_") for o in help_options(fitted["launcher"])} | {"model_param", "port_param", "istemplate"}
    assert set(config) <= accepted
    assert config["model_param"] == str(fitted["out"]) and config["model"] == [str(fitted["out"])]
    assert config["lora"] is None and config["contextsize"] == FIT_CTX and config["usecpu"] is True
    # The launcher reads it back: every key known, the model found (then the excerpt exits).
    out = subprocess.run([sys.executable, str(fitted["launcher"]), "--config", str(written[0])],
                         capture_output=True, text=True).stdout
    assert "unknown keys: []" in out and "model exists: True" in out


def test_a_second_run_reuses_the_mix_and_serves_it(fitted, reference_model, ref_imatrix, tmp_path):
    """backend_selector.py --fit with the same inputs: no requantization (same file, same mtime), then
    the llama-cpp-python fallback server loads it and answers."""
    from nkat_gguf.integrations.kobold import server as kobold_server

    if kobold_server.server_extras_missing():
        pytest.skip(f"llama-cpp-python server extras missing: {kobold_server.SERVER_EXTRAS_PIP}")
    port = kobold_server.free_port()
    log = tmp_path / "server.log"
    script = Path(__file__).resolve().parents[1] / "backend_selector.py"
    argv = fit_args(reference_model, ref_imatrix, fitted["out"], fitted["memory"], "--backend", "llama-cpp-python",
                    "--launch", "--smoke-only", "--port", port, "--max-tokens", 8, "--timeout", 120, "--log", log)
    done = subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    chosen = result["fit"]
    assert chosen["reused"] is True and chosen["file"] == str(fitted["out"])
    assert chosen["type_counts"] == fitted["result"]["fit"]["type_counts"]
    st = fitted["out"].stat()
    assert (st.st_mtime_ns, st.st_ino) == (fitted["mtime"], fitted["inode"])
    assert result["launch"]["server"] == "llama-cpp-python" and result["launch"]["generated"].strip()
    assert "smol fit.gguf" in log.read_text(encoding="utf-8", errors="replace")
    assert not kobold_server.port_in_use("127.0.0.1", port)


def test_a_little_more_memory_keeps_the_fitted_file(fitted, reference_model, ref_imatrix, capsys):
    """Measured free memory moves between runs: 3 MiB more keeps the last file (no new mix); a budget
    below the file's bytes, 6 % above the one it was made for, or other mix inputs do not."""
    from nkat_gguf.cli import main
    from nkat_gguf.jobs.kobold_fit import earlier_fit

    argv = fit_args(reference_model, ref_imatrix, fitted["out"], fitted["memory"] + 3, "--backend", "llama-cpp-python")
    assert main(["kobold", *map(str, argv)]) == 0
    chosen = json.loads(capsys.readouterr().out)["fit"]
    assert chosen["reused"] is True and "made earlier" in chosen["why"]
    assert chosen["plan"]["budget_bytes"] > fitted["result"]["fit"]["plan"]["budget_bytes"]
    assert fitted["out"].stat().st_mtime_ns == fitted["mtime"]
    record = json.loads((fitted["out"].parent / "smol fit-work" / "fit.json").read_text(encoding="utf-8"))
    assert record["file_bytes"] == chosen["file_bytes"] == fitted["out"].stat().st_size
    work = fitted["out"].parent / "smol fit-work"
    assert earlier_fit(work, fitted["out"], record["inputs"], record["file_bytes"] - 1) is None   # no longer fits
    assert earlier_fit(work, fitted["out"], record["inputs"], int(record["budget_bytes"] * 1.06)) is None  # room for more
    assert earlier_fit(work, fitted["out"], {**record["inputs"], "rows": 32}, record["budget_bytes"]) is None


def test_a_reference_that_fits_is_served_as_it_is(reference_model, tmp_path):
    from test_bad_input import nkat

    done = nkat("kobold", "--fit", "--reference", reference_model, "--fit-memory", "2G", "--context-size", FIT_CTX,
                "--backend", "llama-cpp-python", "--fit-output", tmp_path / "never.gguf", "--json")
    assert done.returncode == 0, done.stderr
    chosen = json.loads(done.stdout)["fit"]
    assert chosen["mixed"] is False and chosen["file"] == str(reference_model.resolve())
    assert list(tmp_path.iterdir()) == []


def test_too_little_memory_is_one_line_and_leaves_nothing(reference_model, ref_imatrix, tmp_path):
    from test_bad_input import assert_user_error, nkat

    out = tmp_path / "fit.gguf"
    # Not even the KV cache and buffers fit.
    assert_user_error(nkat("kobold", *fit_args(reference_model, ref_imatrix, out, 100, "--backend", "llama-cpp-python")),
                      "no room for a model")
    # Room for a model, but less than the smallest file these types allow (mostly Q2_K / Q4_0: about 60 MiB).
    memory = free_for_budget(reference_model, 30 * fit.MiB)
    assert_user_error(nkat("kobold", *fit_args(reference_model, ref_imatrix, out, memory, "--backend", "llama-cpp-python")),
                      "below the smallest file", "MiB for the model")
    assert list(tmp_path.iterdir()) == []
    # an output that cannot be written is refused even when the reference would fit as it is
    assert_user_error(nkat("kobold", "--fit", "--fit-memory", "2G", "--fit-output", tmp_path / "no dir" / "f.gguf",
                           "--backend", "llama-cpp-python"), "--fit-output", "does not exist")
    # --fit flags without --fit
    assert_user_error(nkat("kobold", "--fit-memory", "2G", "--backend", "llama-cpp-python"), "--fit-memory needs --fit")


@pytest.mark.skipif(not os.environ.get("KOBOLDCPP"),
                    reason="KoboldCpp is on no package registry here: set $KOBOLDCPP to an installed launcher")
def test_live_koboldcpp_serves_the_fitted_file(fitted, reference_model, ref_imatrix, tmp_path):
    from nkat_gguf.integrations.kobold import server as kobold_server
    from test_bad_input import nkat

    port = kobold_server.free_port()
    done = nkat("kobold", *fit_args(reference_model, ref_imatrix, fitted["out"], fitted["memory"], "--register",
                                    "--admindir", tmp_path / "admin", "--launch", "--smoke-only", "--port", port,
                                    "--timeout", 300))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["fit"]["reused"] is True
    assert result["launch"]["server"] == "koboldcpp" and result["launch"]["generated"].strip()
    config = json.loads((tmp_path / "admin" / "smol fit.kcpps").read_text(encoding="utf-8"))
    assert config["lora"] is None
