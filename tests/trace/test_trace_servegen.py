"""ServeGen sampling: a tiny two-client fixture written here, plus the shared folder."""

import json
from pathlib import Path

import numpy as np
import pytest

from emulator.errors import TraceError
from emulator.trace.importers import import_servegen

SERVEGEN = Path(__file__).parents[2] / ".." / "shared" / "data" / "traces" / "servegen-deepseek-r1"


def pdfs(inputs: dict, outputs: dict, ratios: dict) -> dict:
    return {"input_tokens": repr(inputs), "output_tokens": repr(outputs),
            "reason_ratio": repr(ratios)}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    # Client 0: Gamma (cv 0.5) at 2 req/s in windows 0-2. Client 1: silent in window 0, then
    # Weibull at 1 req/s. The fitted scale (param2) is deliberately off: the rate rules.
    (tmp_path / "chunk-0-trace.csv").write_text(
        "0,2.0,0.5,Gamma,4.0,9.9\n600,2.0,0.5,Gamma,4.0,9.9\n1200,2.0,0.5,Gamma,4.0,9.9\n")
    (tmp_path / "chunk-1-trace.csv").write_text(
        "0,0,0,,0,0\n600,1.0,1.2,Weibull,0.8,9.9\n1200,1.0,1.2,Weibull,0.8,9.9\n")
    (tmp_path / "chunk-0-dataset.json").write_text(json.dumps(
        {"0": pdfs({10: 1, 20: 3}, {100: 1.0}, {0.5: 1.0})}))
    (tmp_path / "chunk-1-dataset.json").write_text(json.dumps(
        {"0": pdfs({7: 1.0}, {40: 0.5, 80: 0.5}, {0.0: 0.5, 0.998: 0.5})}))
    return tmp_path


def test_sample_shape_and_values(folder):
    t = import_servegen(folder, num_requests=None, seed=1)
    # Expected 2*1800 + 1*1200 = 4800 arrivals; a renewal process restarted per window
    # with these cvs stays within a few percent (Poisson sd alone is ~70).
    assert 4500 < len(t) < 5100
    assert np.all(np.diff(t.arrival_time_s) >= 0) and t.arrival_time_s[-1] < 1800
    client0 = t.output_tokens == 100
    assert set(t.prompt_tokens[client0].tolist()) == {10, 20}
    assert np.all(t.reasoning_tokens[client0] == 50)
    client1 = ~client0
    assert set(t.prompt_tokens[client1].tolist()) == {7}
    assert set(t.output_tokens[client1].tolist()) == {40, 80}
    # round(0.998 * 40) = 40 and round(0.998 * 80) = 80: never above the output
    assert set(t.reasoning_tokens[client1].tolist()) == {0, 40, 80}
    assert t.arrival_time_s[client1].min() >= 600  # client 1 silent in window 0
    assert abs(np.mean(t.prompt_tokens[client0] == 20) - 0.75) < 0.03
    assert t.request_id[0] == "servegen-000000"


def test_seeded_and_prefix_stable(folder):
    a = import_servegen(folder, num_requests=1500, seed=5)
    b = import_servegen(folder, num_requests=1500, seed=5)
    small = import_servegen(folder, num_requests=300, seed=5)
    other = import_servegen(folder, num_requests=1500, seed=6)
    assert np.array_equal(a.arrival_time_s, b.arrival_time_s)
    assert np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert np.array_equal(small.arrival_time_s, a.arrival_time_s[:300])
    assert not np.array_equal(a.arrival_time_s, other.arrival_time_s)


def test_span_and_clients(folder):
    t = import_servegen(folder, num_requests=None, seed=0, start_s=650, duration_s=100,
                        clients=[1])
    assert set(t.output_tokens.tolist()) <= {40, 80}
    assert t.arrival_time_s.min() >= 0 and t.arrival_time_s.max() < 100  # relative to start
    assert 50 < len(t) < 170  # about 100 at 1 req/s


def test_progress_is_reported_per_window(folder):
    calls = []
    import_servegen(folder, num_requests=None, seed=0, progress=lambda d, n: calls.append((d, n)))
    assert calls[0] == (1, 144) and calls[-1] == (144, 144)


def test_too_few_requests_is_an_error(folder):
    with pytest.raises(TraceError, match=r"only \d+ requests arrive in \[0.0, 60.0\) s"):
        import_servegen(folder, num_requests=10_000, seed=0, duration_s=60)


def test_literal_eval_never_runs_code(folder, tmp_path):
    marker = tmp_path / "pwned"
    bad = {"0": {"input_tokens": f"__import__('pathlib').Path('{marker}').touch()",
                 "output_tokens": "{1: 1.0}", "reason_ratio": "{0.5: 1.0}"}}
    (folder / "chunk-0-dataset.json").write_text(json.dumps(bad))
    with pytest.raises(TraceError, match=r"^chunk-0-dataset.json: window 0, field input_tokens: "
                                         r"not a Python dict literal"):
        import_servegen(folder, num_requests=10, seed=0)
    assert not marker.exists()


def test_bad_pattern_names_file_and_line(folder):
    (folder / "chunk-1-trace.csv").write_text("0,0,0,,0,0\n600,1.0,1.2,Pareto,0.8,1\n")
    with pytest.raises(TraceError, match=r"^chunk-1-trace.csv: line 2: pattern 'Pareto'"):
        import_servegen(folder, num_requests=10, seed=0)


def test_arrivals_without_pdfs_are_an_error(folder):
    (folder / "chunk-0-dataset.json").write_text(json.dumps(
        {"0": {"input_tokens": "{}", "output_tokens": "{}", "reason_ratio": "{}"}}))
    with pytest.raises(TraceError, match=r"window 0 has no length PDFs"):
        import_servegen(folder, num_requests=10, seed=0)


def test_missing_folder():
    with pytest.raises(TraceError, match=r"no such folder"):
        import_servegen("/nonexistent/servegen", num_requests=1)


@pytest.mark.skipif(not SERVEGEN.is_dir(), reason="../shared/data is absent")
def test_real_servegen_folder():
    t = import_servegen(SERVEGEN, num_requests=3000, seed=0, clients=[35])
    assert len(t) == 3000
    assert np.all(t.reasoning_tokens <= t.output_tokens)
    assert t.output_tokens.max() <= 32768
    # Chunk 35 in window 0 runs at 8.34 req/s: 3000 requests take about 360 s.
    assert 300 < t.arrival_time_s[-1] < 420
