"""benchmarks.floor: the multiply-adds dpclip adds are counted exactly, and the bound is the
stated arithmetic. No timing is asserted: only counts and the formula."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's `benchmarks`, not Opacus's package of that name

from benchmarks import floor  # noqa: E402


def test_bound_is_the_non_private_step_over_it_plus_the_least_extra_time() -> None:
    fast = floor.Timing(step_s=0.8, peak_macs_per_s=8e10, normal_ns=10.0)
    # 0.8 s / (0.8 s + 8e9 / 8e10 s + 1e7 * 10 ns) = 0.8 / (0.8 + 0.1 + 0.1)
    assert fast.bound(8e9, 10**7) == pytest.approx(0.8)
    slow = floor.Timing(step_s=1.6, peak_macs_per_s=4e10, normal_ns=20.0)  # all twice as slow
    mid = floor.Timing(step_s=0.7, peak_macs_per_s=8e10, normal_ns=10.0)
    f = floor.Floor(model="m", batch_size=1, seq_len=None, macs=1e11, extra_macs=8e9,
                    noise_elements=10**7, timings=(fast, slow, mid))  # fmt: skip
    assert f.bound == pytest.approx(0.8)  # the median of 0.8, 0.8 and 0.7 / 0.9
    assert f.step_ms == pytest.approx(800.0)


def test_with_several_batches_per_step_the_grams_are_paid_per_batch_the_noise_once() -> None:
    t = floor.Timing(step_s=0.8, peak_macs_per_s=8e10, normal_ns=10.0)
    # 4 batches: 3.2 s / (3.2 s + 4 x 0.1 s of Grams + 0.1 s of noise)
    assert t.bound(8e9, 10**7, accumulate=4) == pytest.approx(3.2 / 3.7)
    assert t.bound(8e9, 10**7, accumulate=1) == t.bound(8e9, 10**7)
    f = floor.Floor(model="m", batch_size=1, seq_len=None, macs=1e11, extra_macs=8e9,
                    noise_elements=10**7, timings=(t,))  # fmt: skip
    assert f.bound_at(4) == pytest.approx(3.2 / 3.7) and f.bound_at(1) == f.bound
    one, four = floor.markdown([f]), floor.markdown([f], accumulate=4)
    assert "batches/step" not in one and one.splitlines()[2].endswith("| 0.80× |")
    assert four.splitlines()[0].endswith("| bound at 4 batches/step |")
    assert four.splitlines()[2].endswith(f"| 0.80× | {3.2 / 3.7:.2f}× |")


def test_accumulate_below_one_is_refused_before_anything_is_measured(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        floor.main(["--models", "gpt-like", "--accumulate", "0"])
    assert exit_info.value.code == 2
    assert "--accumulate must be at least 1, got 0" in capsys.readouterr().err


def test_extra_multiply_adds_of_gpt_like_are_its_grams_and_small_contractions() -> None:
    """B=2, T=128, width 256, 4 blocks, vocab 5000. Under `mixed`, qkv (256->768), fc
    (256->1024), out (1024->256) and the head (256->5000) take ghost norms: two Grams each,
    B·T²·(in + out). proj (256->256, a tie at T=128) is instantiated: its per-sample matmul does
    the non-private weight gradient's multiply-adds, and the clipped sum is a contraction over
    the batch, B·in·out. Every bias and LayerNorm parameter adds one contraction, B·size. The
    clipped sums of ghost layers cost what the non-private weight gradients cost."""
    b, t, w = 2, 128, 256
    grams = b * t * t * ((w + 3 * w) + (w + 4 * w) + (4 * w + w))
    per_block = grams + b * w * w + b * (3 * w + w + 4 * w + w) + b * 2 * (2 * w)
    expected = 4 * per_block + b * t * t * (w + 5000) + b * 2 * w  # blocks, head, final LN
    got = floor.measure_floor("gpt-like", batch_size=b, repeats=1)
    assert got.extra_macs == expected
    assert got.noise_elements == 5000 * w + 1024 * w + 4 * (12 * w * w + 13 * w) + 2 * w + w * 5000
    assert got.macs > 3 * got.extra_macs and 0 < got.bound < 1
    row = floor.markdown([got]).splitlines()[2]
    assert row.startswith("| gpt-like | 2 | 128 | ") and row.endswith(f"| {got.bound:.2f}× |")


def test_unknown_model_is_an_error_naming_the_choices(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        floor.main(["--models", "gpt-like,nope"])
    assert exit_info.value.code == 2
    assert "unknown model(s) ['nope']; choose from ['cnn'" in capsys.readouterr().err


def test_a_convolutional_model_is_refused_since_the_bound_leaves_convolutions_out(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        floor.main(["--models", "cnn", "--batch-size", "8", "--repeats", "1"])
    assert exit_info.value.code == 2
    assert "cnn: most of its non-private multiply-adds are convolutions" in capsys.readouterr().err
