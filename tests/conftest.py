import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter; the variable must be set before any
# @triton.jit function is created (moba imports triton lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["MOBA_POISON"] = "1"   # fast paths allocate outputs NaN-filled: unwritten elements fail

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
