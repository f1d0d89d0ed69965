"""Fuzzing the two places where untrusted bytes meet C decoders, with the cases of
benchmarks/fuzz.py (which runs many more of them, and calls `images.to_rgb_jpeg` in one place):

(a) for any bytes, `images.to_rgb_jpeg` returns a baseline RGB JPEG the loader can read, or
    raises `images.Rejected`; nothing else escapes (one bad file must not end the shard stage);
(b) for any mutated JPEG, the loader's decode functions return a tensor of the expected shape or
    raise ValueError; they never crash or hang the process.

The cases run in worker processes with a memory limit and a timeout per case, so a segfault or a
hang fails this test instead of ending pytest. A failure names its format, seed and case index;
`python -m benchmarks.fuzz --seed SEED --replay CASE` shows its traceback.
"""

from __future__ import annotations

import pytest

from benchmarks import fuzz

SEED = 1
CASES = 5000  # 27 s on the idle 2-core machine (31 s of CPU); up to 80 s when other jobs share it
# Per case. The slowest take 5-18 s on a busy machine: a JPEG of 1-2 KB claiming, say, 27112 x 2
# px, which the eval 10-crop resizes to 3.5 million x 256 px. A hang never answers.
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def report() -> fuzz.Report:
    return fuzz.run(SEED, CASES, workers=2, timeout_s=TIMEOUT_S)


def test_a_case_is_made_from_its_seed_and_index_alone():
    first, again = fuzz.make_case(SEED, 17), fuzz.make_case(SEED, 17)
    assert (first.data, first.mutation, first.recipe) == (again.data, again.mutation, again.recipe)
    assert fuzz.make_case(SEED, 18).data != first.data


def test_any_bytes_become_a_sample_or_a_named_reject(report):
    failures = report.failures_in("convert")
    assert not failures, fuzz.describe(failures)


def test_mutated_jpegs_decode_or_raise_value_error(report):
    failures = report.failures_in("decode")
    assert not failures, fuzz.describe(failures)


def test_the_cases_reach_every_format_and_outcome(report):
    """A harness that fed only garbage (or nothing) would pass the two tests above."""
    assert set(report.counts["convert"]) == {r.name for r in fuzz.available_recipes()}
    convert = {outcome.split(":")[0] for outcome in report.totals("convert")}
    assert {"passed through", "converted", "rejected"} <= convert
    decode = {outcome.split(":")[0] for outcome in report.totals("decode")}
    assert {"decoded", "refused (ValueError)"} <= decode
