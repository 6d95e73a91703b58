"""The sample traces in traces/ are valid, small, and equal what their recorded commands make."""

from pathlib import Path

import numpy as np
import pytest

from emulator.trace.importers import import_azure
from emulator.trace.io import read_trace
from emulator.trace.synth import synth_trace

REPO = Path(__file__).parents[2]
AZURE_CONV = REPO / ".." / "shared" / "data" / "traces" / "azure-llm-2023" / \
    "AzureLLMInferenceTrace_conv.csv"


def same(a, b) -> bool:
    return (a.request_id.tolist() == b.request_id.tolist()
            and np.array_equal(a.arrival_time_s, b.arrival_time_s)
            and np.array_equal(a.prompt_tokens, b.prompt_tokens)
            and np.array_equal(a.output_tokens, b.output_tokens)
            and (a.reasoning_tokens is None) == (b.reasoning_tokens is None)
            and (a.reasoning_tokens is None or np.array_equal(a.reasoning_tokens,
                                                              b.reasoning_tokens)))


@pytest.mark.parametrize("name", ["azure-conv-500.arrow", "reasoning-200.arrow"])
def test_samples_are_small(name):
    assert (REPO / "traces" / name).stat().st_size < 1_000_000


def test_reasoning_sample_matches_generator():
    t = read_trace(REPO / "traces" / "reasoning-200.arrow")
    assert len(t) == 200 and not t.arrival_time_s.any()
    assert same(t, synth_trace(num_requests=200, lengths="reasoning", arrival="batch", seed=0))


def test_azure_sample_first_rows():
    t = read_trace(REPO / "traces" / "azure-conv-500.arrow")
    assert len(t) == 500
    # First data row of the CSV: 2023-11-16 18:15:46.6805900,374,44
    assert (t.request_id[0], t.arrival_time_s[0], t.prompt_tokens[0], t.output_tokens[0]) == \
        ("azure-000000", 0.0, 374, 44)
    assert t.request_id[-1] == "azure-000499"


@pytest.mark.skipif(not AZURE_CONV.is_file(), reason="../shared/data is absent")
def test_azure_sample_matches_import():
    t = read_trace(REPO / "traces" / "azure-conv-500.arrow")
    assert same(t, import_azure(AZURE_CONV, num_requests=500))
