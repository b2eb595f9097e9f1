"""Scan family (step_gae, discounted_returns): ``kernel.py`` holds the ``@triton.jit``
kernels, ``ops.py`` the launcher, registered ops, fakes, autograd and the backend functions."""
