"""Fixtures of the loss tests; the helpers live in loss_helpers.py."""

import pytest
from loss_helpers import pair_inputs, seq


@pytest.fixture
def make_pair():
    return pair_inputs


@pytest.fixture
def make_seq():
    return seq
