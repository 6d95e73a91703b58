"""Synthetic generators: determinism, arrival processes and the reasoning length shape."""

import numpy as np
import pytest

from emulator.errors import UserError
from emulator.trace.synth import sample_arrivals, synth_trace


def test_same_seed_same_trace_other_seed_differs():
    a = synth_trace(num_requests=500, arrival="poisson", rate=3.0, seed=11)
    b = synth_trace(num_requests=500, arrival="poisson", rate=3.0, seed=11)
    c = synth_trace(num_requests=500, arrival="poisson", rate=3.0, seed=12)
    for col in ("arrival_time_s", "prompt_tokens", "output_tokens", "reasoning_tokens"):
        assert np.array_equal(getattr(a, col), getattr(b, col))
        assert not np.array_equal(getattr(a, col), getattr(c, col))
    assert a.request_id[0] == "reasoning-000000" and len(set(a.request_id)) == 500


def test_lengths_do_not_depend_on_arrival_process():
    batch = synth_trace(num_requests=100, seed=4)
    gamma = synth_trace(num_requests=100, arrival="gamma", rate=2.0, cv=3.0, seed=4)
    assert np.array_equal(batch.output_tokens, gamma.output_tokens)


def test_batch_arrivals_are_all_zero():
    t = synth_trace(num_requests=50, lengths="fixed", prompt_tokens=128, output_tokens=64)
    assert not t.arrival_time_s.any()
    assert set(t.prompt_tokens.tolist()) == {128} and set(t.output_tokens.tolist()) == {64}
    assert t.reasoning_tokens is None


def test_poisson_rate_and_cv():
    gaps = np.diff(sample_arrivals("poisson", 40_000, np.random.default_rng(0), rate=5.0))
    # Mean gap 0.2 s; the sample mean's sd is 0.2/sqrt(40000) = 0.001, so +-0.005 is 5 sd.
    assert abs(gaps.mean() - 0.2) < 0.005
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.03


def test_gamma_rate_and_cv():
    times = sample_arrivals("gamma", 40_000, np.random.default_rng(0), rate=2.0, cv=3.0)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.5) / 0.5 < 0.06  # sd of the mean is 3/sqrt(40000) = 1.5%
    assert abs(gaps.std() / gaps.mean() - 3.0) < 0.3


def test_uniform_lengths_cover_inclusive_range():
    t = synth_trace(num_requests=2000, lengths="uniform", prompt_tokens=(5, 8),
                    output_tokens=(1, 3), seed=1)
    assert set(t.prompt_tokens.tolist()) == {5, 6, 7, 8}
    assert set(t.output_tokens.tolist()) == {1, 2, 3}


def test_reasoning_shape_on_20000_samples():
    """Targets from the brief. With n = 20,000 a proportion's sd is at most
    sqrt(0.25 / 20000) = 0.0035; the +-0.02 bands are about 6 sd, so they hold for any seed
    while still catching a wrong distribution (e.g. 0.70 or 0.50 would fail)."""
    t = synth_trace(num_requests=20_000, seed=0)
    p, o, r = t.prompt_tokens, t.output_tokens, t.reasoning_tokens
    assert abs(np.mean((p >= 50) & (p <= 150)) - 0.77) < 0.02
    assert np.mean(p > 300) < 0.05
    assert abs(np.mean(o > 5000) - 0.45) < 0.02
    assert o.max() == 32768 and np.all(o >= 1)
    assert np.all(r <= o - 1) and np.all(r >= 0)
    assert 0.75 < np.mean(r / o) < 0.85  # "a large fraction": Beta(8, 2) has mean 0.8


def test_cap_applies():
    t = synth_trace(num_requests=5000, max_output_tokens=4096, seed=2)
    assert t.output_tokens.max() == 4096


@pytest.mark.parametrize("kwargs,match", [
    (dict(arrival="poisson"), r"arrival 'poisson' needs rate > 0"),
    (dict(arrival="gamma", rate=1.0), r"arrival 'gamma' needs cv > 0"),
    (dict(arrival="batch", rate=1.0), r"rate/cv do not apply to arrival 'batch'"),
    (dict(arrival="poisson", rate=1.0, cv=2.0), r"cv applies to arrival 'gamma' only"),
    (dict(lengths="fixed"), r"lengths 'fixed' needs prompt_tokens \(--prompt-tokens\)"),
    (dict(lengths="fixed", prompt_tokens=(1, 2), output_tokens=3), r"needs a single"),
    (dict(lengths="uniform", prompt_tokens=(5, 2), output_tokens=3), r"1 <= low <= high"),
    (dict(lengths="fixed", prompt_tokens=1, output_tokens=99, max_output_tokens=10),
     r"output_tokens 99 exceeds max_output_tokens 10"),
    (dict(prompt_tokens=10), r"apply to lengths 'fixed' and 'uniform' only"),
    (dict(lengths="zipf"), r"lengths must be one of"),
    (dict(num_requests=0), r"num_requests must be >= 1"),
])
def test_bad_parameters_are_user_errors(kwargs, match):
    kwargs.setdefault("num_requests", 10)
    with pytest.raises(UserError, match=match):
        synth_trace(**kwargs)
