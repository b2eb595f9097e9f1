"""Test fixture: a CPU "platform" for verl 0.9, so verl's engine workers run in-process here.

verl resolves its device through ``verl.plugin.platform`` (CUDA / NPU / ROCm are built in).
This registers ``"cpu"`` (device "cpu", gloo, memory queries answering 0); select it with
``VERL_PLATFORM=cpu`` and load it with ``VERL_USE_EXTERNAL_MODULES`` before ``import verl``
finishes (tests/integrations/test_verl_workers.py does both). Test-only: never library code.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


def _zero(*_args, **_kwargs):
    return 0


# what verl asks of a device module (memory statistics, caches, streams): harmless on CPU
_DEVICE_MODULE = types.SimpleNamespace(
    is_available=lambda: True,
    device_count=lambda: 1,
    current_device=lambda: "cpu",
    set_device=lambda *_a, **_k: None,
    synchronize=lambda *_a, **_k: None,
    empty_cache=lambda: None,
    manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed,
    max_memory_allocated=_zero,
    max_memory_reserved=_zero,
    memory_allocated=_zero,
    memory_reserved=_zero,
    reset_peak_memory_stats=lambda *_a, **_k: None,
    mem_get_info=lambda *_a, **_k: (0, 0),
    get_rng_state=torch.get_rng_state,
    set_rng_state=torch.set_rng_state,
    is_initialized=lambda: True,
    get_device_name=lambda *_a, **_k: "CPU",
)


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    device_name = "cpu"
    vendor_name = "cpu"
    device_module = _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return True

    def current_device(self):
        return "cpu"  # verl moves modules and tensors to get_device_id()

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index=None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None
