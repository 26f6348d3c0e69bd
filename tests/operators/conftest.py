import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The operator tests run many tiny ops; intra-op threads only add contention on a shared
    2-core machine (tens of ms per call), so run them single-threaded and restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
