"""Test configuration. The Triton interpreter must be switched on before triton decorates any
kernel, so it is set here, before steppo_fast (or triton) is imported by a test module."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Tolerances tied to dtype (absolute, relative), for results accumulated in fp32. bf16 inputs are
# compared with an fp32 reference fed the same (rounded) bf16 values: fp32 tolerance.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),
}
