"""Every error dpclip raises for a user's mistake lives in dpclip.errors and is exported."""

import dpclip
from dpclip import errors


def test_every_error_is_exported_from_dpclip_and_keeps_its_builtin_base():
    bases = {
        "IntegrityError": ValueError, "SelfCheckError": errors.IntegrityError,
        "ParameterUseError": RuntimeError, "UnsupportedModuleError": ValueError,
        "NonFiniteNormError": FloatingPointError, "PhysicalBatchTooLarge": ValueError,
        "DoubleBackwardError": RuntimeError, "LoopOrderError": RuntimeError,
        "PrivacyBudgetExceeded": RuntimeError, "DistributedStepError": RuntimeError,
        "SampleRateError": ValueError,
    }  # fmt: skip
    assert set(errors.__all__) == set(bases)
    for name, base in bases.items():
        assert getattr(dpclip, name) is getattr(errors, name)
        assert issubclass(getattr(errors, name), base)
    assert issubclass(errors.ParameterUseError, errors.IntegrityError)


def test_the_accountant_and_the_engine_raise_the_same_budget_error():
    assert dpclip.accounting.PrivacyBudgetExceeded is errors.PrivacyBudgetExceeded


def test_a_loop_used_out_of_order_raises_loop_order_error():
    import pytest
    import torch

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1.0)
    with pytest.raises(errors.LoopOrderError, match="without a backward pass"):
        opt.step()
