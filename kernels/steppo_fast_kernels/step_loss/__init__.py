"""Step-loss family (step_policy_loss): ``kernel.py`` (token forward/backward kernels and the
per-step table columns), ``kernel_traj.py`` (the per-trajectory pass) and ``kernel_finish.py``
(the finishing reduction) hold the ``@triton.jit`` code; ``ops.py`` the launchers, registered
ops, fake, autograd and the backend function."""
