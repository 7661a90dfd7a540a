"""Operations dispatched per training step (issue: host overhead on GPUs): exact counts, no timing.

The ceilings are the counts reached so far; the goal is at most 1.5× non-private training on
both reference points. A change that dispatches more per step fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's `benchmarks`

from benchmarks.ops import REFERENCES, build_step, count_step  # noqa: E402

CEILINGS = {"gpt-like-small": 1.3, "cnn": 1.5}  # dpclip ops / non-private ops


@pytest.mark.parametrize("ref", [r for r in REFERENCES if r.name in CEILINGS], ids=lambda r: r.name)
def test_dpclip_dispatches_at_most_its_ceiling_of_non_private_ops(ref):
    plain, private = build_step(ref, "non-private"), build_step(ref, "dpclip")
    base, dp = count_step(plain), count_step(private)
    assert count_step(private).ops == dp.ops  # exact: the same operations every step
    assert dp.ops["aten.normal_"] >= 1 and private.engine.steps_taken == 4  # private steps
    assert dp.total <= CEILINGS[ref.name] * base.total, (dp.total, base.total)
    assert "aten._local_scalar_dense" not in base.ops
    # one host read per step at most: the finite check of the norms (and a CPU noise seed)
    assert dp.ops["aten._local_scalar_dense"] <= 2
