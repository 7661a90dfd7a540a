"""ε against published numbers and exact closed forms, not only against dp_accounting itself."""

from __future__ import annotations

import math

import pytest
from scipy import optimize, special
from scipy.stats import norm

from dpclip.accounting import get_epsilon, get_noise_multiplier


def eps(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    return get_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta,
                       accountant=accountant)  # fmt: skip


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018, Thm. 8: the exact ε of one Gaussian mechanism with sensitivity 1,
    δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ), in logs so that ε may be in the millions."""

    def log_delta_of(e: float) -> float:
        first = special.log_ndtr(1 / (2 * sigma) - e * sigma)
        second = e + special.log_ndtr(-1 / (2 * sigma) - e * sigma)
        return first + math.log1p(-math.exp(second - first))

    upper = 300.0 + sigma**-2
    return optimize.brentq(lambda e: log_delta_of(e) - math.log(delta), 0.0, upper, xtol=1e-13)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("steps", [1, 25])
def test_pld_matches_exact_gaussian_curve_when_q_is_one(sigma, steps):
    # T rounds of the Gaussian mechanism at σ compose exactly to one Gaussian at σ / sqrt(T).
    exact = exact_gaussian_epsilon(sigma / math.sqrt(steps), 1e-5)
    pld = eps("pld", sigma, 1.0, steps, 1e-5)
    assert exact * (1 - 1e-9) <= pld <= exact * (1 + 1e-3)  # an upper bound, 0.1 % tight
    assert eps("rdp", sigma, 1.0, steps, 1e-5) >= exact  # RDP is a looser upper bound


def test_abadi_2016_setting_is_below_the_moments_accountant_bound():
    # Abadi et al. 2016, §3.1: q = 0.01, σ = 4, T = 10,000, δ = 1e-5 gives ε ≈ 1.26 with the
    # moments accountant. RDP computes the same log-moments exactly (Mironov, Talwar, Zhang 2019)
    # and converts to (ε, δ) with the sharper rule of Balle et al. 2020, so it must not exceed
    # 1.26, and the two differ by about 1.2× (the conversion accounts for most of it): we allow
    # [1.26 / 1.3, 1.26]. PLD is tighter still (no conversion loss) but not by more than RDP's
    # typical 5-15 % margin.
    rdp = eps("rdp", 4.0, 0.01, 10_000, 1e-5)
    pld = eps("pld", 4.0, 0.01, 10_000, 1e-5)
    assert 1.26 / 1.3 <= rdp <= 1.26
    assert rdp / 1.15 <= pld <= rdp


# tensorflow/privacy, tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py,
# test_compute_dp_sgd_privacy: (n, batch, σ, epochs, δ) -> RDP ε, with steps = ceil(epochs·n/batch).
@pytest.mark.parametrize(
    ("n", "batch", "sigma", "epochs", "delta", "expected"),
    [
        (60000, 150, 1.3, 15, 1e-5, 0.7242234026109595),
        (100000, 100, 1.0, 30, 1e-7, 1.4154988495444842),
    ],
)
def test_rdp_matches_tf_privacy_compute_dp_sgd_privacy(n, batch, sigma, epochs, delta, expected):
    steps = math.ceil(epochs * n / batch)
    assert eps("rdp", sigma, batch / n, steps, delta) == pytest.approx(expected, rel=1e-7)


def test_rdp_and_pld_match_tf_privacy_example_privacy():
    # Same file, test_compute_dp_sgd_example_privacy, "no_microbatching_with_subsampling":
    # 1.2 epochs at q = 1e-2 (120 steps), σ = 0.7, δ = 1e-5: RDP 3.2392676, PLD 2.4612381.
    assert eps("rdp", 0.7, 1e-2, 120, 1e-5) == pytest.approx(3.2392676, abs=1e-7)
    pld = eps("pld", 0.7, 1e-2, 120, 1e-5)
    assert 2.4612381 * (1 - 1e-5) <= pld <= 2.4612381 * (1 + 1e-3)


def test_rdp_and_pld_match_tf_privacy_privacy_statement():
    # Same file, test_dp_sgd_privacy_statement_*: 10,000 examples, batch 64, 5 epochs (782
    # steps), σ = 2.0 with microbatching, which doubles the add/remove sensitivity (σ_eff = 1.0),
    # δ = 1e-6, Poisson sampling: "RDP 1.616", "PLD 1.199" (printed to 3 decimals).
    assert round(eps("rdp", 1.0, 64 / 10000, 782, 1e-6), 3) == 1.616
    assert round(eps("pld", 1.0, 64 / 10000, 782, 1e-6), 3) == 1.199


def test_rdp_matches_opacus_accountants_test():
    # pytorch/opacus, opacus/tests/accountants_test.py, test_rdp_accountant: σ = 1.5, q = 0.04,
    # int(90 / 0.04) = 2250 steps, δ = 1e-5 -> 7.32911117143 with Opacus's orders. dp_accounting's
    # order grid is slightly different, so the optimum differs in the 5th digit.
    assert eps("rdp", 1.5, 0.04, 2250, 1e-5) == pytest.approx(7.32911117143, rel=1e-4)


def test_gdp_matches_opacus_accountants_test():
    # Same file, test_gdp_accountant: 6.59 < ε < 6.6 for σ = 1.5, q = 0.04 and
    # int(90 // 0.04) steps, which is 2249 (floor division of floats).
    assert 6.59 < eps("gdp", 1.5, 0.04, int(90 // 0.04), 1e-5) < 6.6


def test_rdp_noise_calibration_matches_opacus():
    # Same file, test_get_noise_multiplier: ε = 8, δ = 1e-5, q = 0.04, 90 epochs. Opacus 1.6
    # (same RDP conversion) returns 1.416015625 with an absolute ε tolerance of 0.01; our window
    # is [0.99·8, 8], so σ agrees within 1 % and our ε is never above the target.
    sigma = get_noise_multiplier(target_epsilon=8, delta=1e-5, sample_rate=0.04, steps=2250,
                                 accountant="rdp")  # fmt: skip
    assert sigma == pytest.approx(1.416015625, rel=0.01)
    assert 0.99 * 8 <= eps("rdp", sigma, 0.04, 2250, 1e-5) <= 8


def gdp_closed_form(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε of μ-GDP with μ = q·sqrt(T·(e^{1/σ²} − 1)) (Bu et al. 2020)."""
    return gdp_epsilon_for_mu(q * math.sqrt(steps * (math.exp(sigma**-2) - 1)), delta)


def gdp_epsilon_for_mu(mu: float, delta: float) -> float:
    """Invert δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Dong, Roth, Su 2019) by bisection."""

    def delta_of(e: float) -> float:
        return norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.1, 0.004, 10_000), (4.0, 0.01, 10_000), (0.8, 0.02, 500)]
)
def test_gdp_matches_its_closed_form(sigma, q, steps):
    assert eps("gdp", sigma, q, steps, 1e-5) == pytest.approx(
        gdp_closed_form(sigma, q, steps, 1e-5), rel=1e-9
    )


def test_rdp_of_a_mixed_history_equals_dp_accountings_own_composition():
    """dpclip composes RDP from cached one-step curves (Σ steps · curve); dp_accounting's
    RdpAccountant composing the whole history is the oracle, to the last bit or nearly."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    from dpclip.accounting import accountants
    from dpclip.accounting.accountants import epsilon
    from dpclip.accounting.events import GaussianStep

    history = (GaussianStep(1.1, 0.004, 700), GaussianStep(0.6, 0.05, 30),
               GaussianStep(1.1, 0.004, 1), GaussianStep(4.0, 1.0, 12))  # fmt: skip
    for delta in (1e-5, 1e-8):
        oracle = rdp_privacy_accountant.RdpAccountant()
        for e in history:
            event = dp_accounting.PoissonSampledDpEvent(
                e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
            )
            oracle.compose(event, e.steps)
        assert epsilon(history, delta, "rdp") == pytest.approx(oracle.get_epsilon(delta), rel=1e-12)
    cached = accountants._rdp_one_step(1.1, 0.004)  # shared by every later ε: never writable
    with pytest.raises(ValueError):
        cached.flags.writeable = True


def test_pld_of_ten_million_steps_is_a_tight_upper_bound_on_the_exact_gaussian_curve():
    """Beyond 10⁵ steps the PLD is composed by repeated squaring (this case took 26 s before, now
    under a second); with q = 1 the composition is one Gaussian at σ / sqrt(T), exact."""
    sigma, steps = 3000.0, 10**7
    exact = exact_gaussian_epsilon(sigma / math.sqrt(steps), 1e-5)
    assert exact * (1 - 1e-9) <= eps("pld", sigma, 1.0, steps, 1e-5) <= exact * (1 + 2e-3)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 200_000), (2.0, 0.05, 300_000)])
def test_pld_by_repeated_squaring_matches_dp_accountings_pld_accountant(sigma, q, steps):
    """Same grid, two ways of composing: they agree to 1e-6; on a ten times finer grid (closer to
    the exact ε) dp_accounting is lower, by the 0.1 % the discretization rule allows."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    from dpclip.accounting.accountants import pld_discretization
    from dpclip.accounting.events import GaussianStep

    interval = pld_discretization((GaussianStep(sigma, q, steps),))
    ours = eps("pld", sigma, q, steps, 1e-5)
    for scale, low, high in ((1, 1 - 1e-6, 1 + 1e-6), (0.1, 1.0, 1 + 2e-3)):
        oracle = pld_privacy_accountant.PLDAccountant(
            value_discretization_interval=interval * scale
        )
        oracle.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                       steps)  # fmt: skip
        assert low <= ours / oracle.get_epsilon(1e-5) <= high


def test_pld_for_tiny_sigma_is_an_upper_bound_on_the_exact_curve_and_fits_in_memory():
    """σ = 1e-3: one step's privacy loss spans 10⁶; the grid cap of 1e-2 used to override the
    bound of 200,000 points per step (10⁸ points: out of memory)."""
    from dpclip.accounting.accountants import _single_step_loss_span, pld_discretization
    from dpclip.accounting.events import GaussianStep

    interval = pld_discretization((GaussianStep(1e-3, 0.01, 100),))
    assert _single_step_loss_span(1e-3, 0.01) / interval <= 200_000
    exact = exact_gaussian_epsilon(1e-3 / math.sqrt(100), 1e-5)  # q = 1: one Gaussian again
    assert exact <= eps("pld", 1e-3, 1.0, 100, 1e-5) <= exact * (1 + 1e-3)
