"""Segment family (segment_sum, segment_mean, segment_broadcast): ``kernel.py`` holds the
``@triton.jit`` kernels, ``ops.py`` the launchers, registered ops, fakes, autograd and the
backend functions."""
