import os

# Both must be set before any @triton.jit function is created or any output allocated.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["MOBA_POISON"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
