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


# Modules that run (tiny) transformers models: one torch thread. Small models are fastest on one
# thread, and two threads on a loaded 2-vCPU machine made them up to ~10x slower; the kernel and
# C++ tests keep the default thread count (their OpenMP paths are what they test). The count is
# restored after each test, so the result does not depend on test order (Trainer sets it too).
ONE_THREAD_MODULES = ("test_trainer", "test_layouts_model", "test_distributed")


@pytest.fixture(autouse=True)
def _threads(request):
    name = request.module.__name__.rsplit(".", 1)[-1]
    if not name.startswith(ONE_THREAD_MODULES):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Tolerances tied to dtype (absolute, relative), for results accumulated in fp32. bf16 inputs are
# compared with an fp32 reference fed the same (rounded) bf16 values: fp32 tolerance.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),
}
