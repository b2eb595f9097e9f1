"""Backend selection for the public wrappers, traceable by ``torch.compile``.

:func:`steppo_fast._dispatch.resolve` imports backend modules and caches them with
``functools.cache``, which Dynamo cannot trace (``importlib.import_module`` is marked as
skipped). The choice depends only on ``impl``, the op name and the inputs' device type, all
constants while tracing, so under ``torch.compile`` it is made eagerly at trace time
(``torch.compiler.assume_constant_result``, which yields the module's name: a module object is
not a guardable constant) and the module is then reached by plain ``import`` statements. A later
call with another ``impl`` or device re-traces through Dynamo's guards on those constants. In
eager mode this is exactly ``_dispatch.resolve``.
"""

from __future__ import annotations

import torch

from .. import _dispatch


@torch.compiler.assume_constant_result
def _backend_name(impl: str, op: str, device_type: str) -> str:
    """Name of the backend module (runs eagerly at trace time; a constant in the graph)."""
    # a 0-element probe on the device stands for the inputs (resolve reads only device types)
    return _dispatch.resolve(impl, op, torch.empty(0, device=device_type)).__name__


def _traceable_import(name: str):
    """The backend module called ``name`` (already imported by ``_backend_name``), through
    ``import`` statements, which Dynamo traces (``importlib.import_module`` it does not)."""
    if name == "steppo_fast.cpu":
        from .. import cpu as module
    elif name == "steppo_fast.kernels":
        from .. import kernels as module
    else:
        from .. import reference as module
    return module


def resolve(impl: str, op: str, *tensors):
    """The backend module running ``op`` for ``tensors`` under ``impl`` (see
    :func:`steppo_fast._dispatch.resolve`; same errors)."""
    if not torch.compiler.is_compiling():
        return _dispatch.resolve(impl, op, *tensors)
    return _traceable_import(_backend_name(impl, op, _dispatch.device_type_of(tensors)))
