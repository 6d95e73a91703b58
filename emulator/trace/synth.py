"""Synthetic traces: arrival processes and length distributions, seeded and deterministic.

Arrivals (the first request arrives at t = 0; later ones at the cumulative sum of the
inter-arrival gaps):

- ``batch``: every request at t = 0 (batch-drain experiments);
- ``poisson``: exponential gaps with mean 1/rate;
- ``gamma``: Gamma gaps with mean 1/rate and coefficient of variation ``cv``
  (shape = 1/cv^2, scale = 1/(rate * shape)); cv = 1 is Poisson, cv > 1 is burstier.

Lengths:

- ``fixed``: every request has ``prompt_tokens`` / ``output_tokens``;
- ``uniform``: integers drawn uniformly from inclusive ``(low, high)`` ranges;
- ``reasoning``: shaped like a reasoning model serving NaturalReasoning-style prompts. The
  targets (from the project brief, not fitted to a released trace) are: about 77% of prompts
  in 50-150 tokens and few (< 5%) over 300; outputs heavy-tailed with about 45% over 5,000
  tokens, capped at ``max_output_tokens``; most of each output spent reasoning. The
  parameters below reproduce these targets (tests/trace/test_synth.py checks them on 20,000
  samples):
  prompt ~ 97% lognormal(median 95, sigma 0.44) + 3% lognormal(median 400, sigma 0.7), the
  second component giving a thin tail of long prompts; output ~ lognormal(sigma 1.0) with
  median 5000 / exp(sigma * z_0.55) so that P(output > 5000) = 0.45 before the cap (about 2%
  of requests hit the default 32,768 cap); reasoning fraction ~ Beta(8, 2) (mean 0.8), with
  at least one answer token after the reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emulator.errors import UserError
from emulator.trace.schema import Trace

ARRIVALS = ("batch", "poisson", "gamma")
LENGTHS = ("reasoning", "fixed", "uniform")

# Reasoning length model (see the module docstring for the targets these meet).
_PROMPT_MAIN = (0.97, 95.0, 0.44)  # (weight, median tokens, sigma of log)
_PROMPT_TAIL = (400.0, 0.7)  # (median tokens, sigma of log) of the long-prompt component
_OUTPUT_SIGMA = 1.0
_Z_055 = 0.12566  # standard-normal quantile at 0.55: P(Z > 0.12566) = 0.45
_OUTPUT_MEDIAN = 5000.0 / np.exp(_OUTPUT_SIGMA * _Z_055)
_REASON_BETA = (8.0, 2.0)


class SynthError(UserError, ValueError):
    """Invalid generator parameters; the message names the parameter."""


def sample_arrivals(kind: str, num_requests: int, rng: np.random.Generator, *,
                    rate: float | None = None, cv: float | None = None) -> np.ndarray:
    """Arrival times in seconds, float64 [num_requests], starting at 0 and non-decreasing."""
    if kind not in ARRIVALS:
        raise SynthError(f"arrival must be one of {', '.join(ARRIVALS)}, got {kind!r}")
    if kind == "batch":
        if rate is not None or cv is not None:
            raise SynthError("rate/cv do not apply to arrival 'batch' (all requests at t=0)")
        return np.zeros(num_requests, dtype=np.float64)
    if rate is None or not rate > 0 or not np.isfinite(rate):
        raise SynthError(f"arrival {kind!r} needs rate > 0 (requests per second), got {rate}")
    if kind == "poisson":
        if cv is not None:
            raise SynthError("cv applies to arrival 'gamma' only (poisson has cv = 1)")
        gaps = rng.exponential(1.0 / rate, size=max(num_requests - 1, 0))
    else:
        if cv is None or not cv > 0 or not np.isfinite(cv):
            raise SynthError(f"arrival 'gamma' needs cv > 0, got {cv}")
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=max(num_requests - 1, 0))
    return np.concatenate(([0.0], np.cumsum(gaps)))[:num_requests]


def _range(name: str, value: int | Sequence[int] | None, kind: str) -> tuple[int, int]:
    if value is None:
        raise SynthError(f"lengths {kind!r} needs {name} (--{name.replace('_', '-')})")
    lo, hi = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if kind == "fixed" and lo != hi:
        raise SynthError(f"lengths 'fixed' needs a single {name}, got {lo}..{hi}")
    if not 1 <= lo <= hi:
        raise SynthError(f"{name} must satisfy 1 <= low <= high, got {lo}..{hi}")
    return int(lo), int(hi)


def sample_reasoning_lengths(num_requests: int, rng: np.random.Generator, *,
                             max_output_tokens: int = 32768
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, output, reasoning) token counts, int32 [num_requests] each."""
    weight, median, sigma = _PROMPT_MAIN
    main = rng.lognormal(np.log(median), sigma, num_requests)
    tail = rng.lognormal(np.log(_PROMPT_TAIL[0]), _PROMPT_TAIL[1], num_requests)
    prompt = np.where(rng.random(num_requests) < weight, main, tail)
    output = rng.lognormal(np.log(_OUTPUT_MEDIAN), _OUTPUT_SIGMA, num_requests)
    frac = rng.beta(*_REASON_BETA, num_requests)
    prompt_tokens = np.maximum(1, np.rint(prompt)).astype(np.int32)
    output_tokens = np.clip(np.rint(output), 1, max_output_tokens).astype(np.int32)
    # Keep at least one answer token: reasoning <= output - 1.
    reasoning = np.minimum(np.floor(frac * output_tokens), output_tokens - 1)
    return prompt_tokens, output_tokens, reasoning.astype(np.int32)


def synth_trace(*, num_requests: int, lengths: str = "reasoning", arrival: str = "batch",
                rate: float | None = None, cv: float | None = None,
                prompt_tokens: int | Sequence[int] | None = None,
                output_tokens: int | Sequence[int] | None = None,
                max_output_tokens: int = 32768, seed: int = 0) -> Trace:
    """A validated synthetic trace; the same arguments always give the same trace.

    ``prompt_tokens`` / ``output_tokens`` are an int for ``fixed`` and an inclusive
    ``(low, high)`` pair for ``uniform``; they must be None for ``reasoning``.
    Lengths and arrivals use independent random streams, so changing the arrival process
    keeps the lengths.
    """
    if num_requests < 1:
        raise SynthError(f"num_requests must be >= 1, got {num_requests}")
    if max_output_tokens < 1:
        raise SynthError(f"max_output_tokens must be >= 1, got {max_output_tokens}")
    if lengths not in LENGTHS:
        raise SynthError(f"lengths must be one of {', '.join(LENGTHS)}, got {lengths!r}")
    length_rng, arrival_rng = (np.random.default_rng(s)
                               for s in np.random.SeedSequence(seed).spawn(2))
    reasoning = None
    if lengths == "reasoning":
        if prompt_tokens is not None or output_tokens is not None:
            raise SynthError("prompt_tokens/output_tokens apply to lengths 'fixed' and "
                             "'uniform' only; 'reasoning' draws them")
        prompt, output, reasoning = sample_reasoning_lengths(
            num_requests, length_rng, max_output_tokens=max_output_tokens)
    else:
        p_lo, p_hi = _range("prompt_tokens", prompt_tokens, lengths)
        o_lo, o_hi = _range("output_tokens", output_tokens, lengths)
        if o_hi > max_output_tokens:
            raise SynthError(f"output_tokens {o_hi} exceeds max_output_tokens "
                             f"{max_output_tokens}; lower it or raise the cap")
        prompt = length_rng.integers(p_lo, p_hi, size=num_requests, endpoint=True)
        output = length_rng.integers(o_lo, o_hi, size=num_requests, endpoint=True)
    arrivals = sample_arrivals(arrival, num_requests, arrival_rng, rate=rate, cv=cv)
    ids = np.array([f"{lengths}-{i:06d}" for i in range(num_requests)], dtype=object)
    trace = Trace(ids, arrivals, prompt.astype(np.int32), output.astype(np.int32), reasoning)
    return trace.validate(f"synth {lengths}/{arrival}")
