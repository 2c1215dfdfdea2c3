"""Shared pipeline-test setup."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: intra-op threads only add overhead (a lot of it on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
