"""Shared input checks: `trusted_inputs()` skips the host reads of values, nothing else."""
import pytest
import torch

from dustin_kernels import _checks, trusted_inputs


def test_trusted_inputs_skips_only_the_value_checks():
    too_long = torch.tensor([9], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens"):
        _checks.check_seq_lens(too_long, 1, 1, 8, too_long.device)
    with trusted_inputs():
        assert not _checks.values_checkable(too_long)
        _checks.check_seq_lens(too_long, 1, 1, 8, too_long.device)  # the value is not read
        with pytest.raises(ValueError, match="seq_lens"):  # shapes still are
            _checks.check_seq_lens(too_long, 2, 1, 8, too_long.device)
    assert _checks.values_checkable(too_long)
