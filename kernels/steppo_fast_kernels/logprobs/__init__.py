"""Log-prob family (linear_logprobs): ``kernel.py`` holds the ``@triton.jit`` kernels,
``ops.py`` the launchers, registered ops, fakes, autograd and the backend function."""
