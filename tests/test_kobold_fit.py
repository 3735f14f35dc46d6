"""nkat kobold --fit's memory arithmetic against what llama.cpp itself allocates."""

from __future__ import annotations

import re

import pytest

from nkat_gguf.errors import UserError
from nkat_gguf.integrations.kobold import fit


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
