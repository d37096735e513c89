import logging
import warnings

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bnbF():
    """bitsandbytes.functional: the reference we must match byte for byte (CPU build)."""
    import bitsandbytes.functional as F

    return F
