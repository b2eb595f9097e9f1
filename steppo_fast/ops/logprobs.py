"""Public fused linear log-prob op: validation + dispatch by ``impl=``."""

from __future__ import annotations

import numbers

import torch

from .._dispatch import resolve
from .._validate import (
    check_finite,
    check_float,
    check_index,
    check_index_range,
    is_finite_number,
    min_max_all,
)


def _validate(hidden, weight, targets, bias, temperature, return_entropy, chunk_size) -> None:
    check_float("hidden", hidden, ndim=2)
    device = hidden.device
    check_float("weight", weight, ndim=2, device=device)
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != width:
        raise ValueError(
            f"weight: shape {tuple(weight.shape)} must be [V, H] with H = hidden.shape[1] = {width}"
        )
    if vocab == 0:
        raise ValueError("weight: needs at least one row (vocabulary entry), got shape [0, H]")
    _check_same_family("weight", weight, hidden)
    if bias is not None:
        check_float("bias", bias, ndim=1, length=vocab, device=device)
        _check_same_family("bias", bias, hidden)
    check_index("targets", targets, length=num_rows, device=device)
    # one host transfer for every value check: targets in range, float inputs finite
    t_bounds, *f_bounds = min_max_all(targets, hidden, weight, bias)
    check_index_range("targets", targets, vocab, rule=f"[0, V) with V = {vocab}", bounds=t_bounds)
    for name, x, b in zip(("hidden", "weight", "bias"), (hidden, weight, bias), f_bounds):
        if b is not None:
            check_finite(name, x, bounds=b)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature: expected a real number, got {type(temperature).__name__}")
    if not (is_finite_number(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be finite and > 0, got {temperature}")
    if f_bounds[0] is not None and f_bounds[1] is not None:  # values were read
        _check_logit_range(f_bounds, width, temperature, hidden.dtype)
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy: expected a bool, got {type(return_entropy).__name__}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise ValueError(
                f"chunk_size: expected an int or None, got {type(chunk_size).__name__}"
            )
        if chunk_size <= 0:
            raise ValueError(f"chunk_size: must be > 0 rows, got {chunk_size}")


def _check_logit_range(bounds, width: int, temperature: float, dtype) -> None:
    """Finite inputs whose logits could overflow the compute dtype are refused (the log-probs
    would be inf - inf = NaN on every backend): |z| <= (max|hidden| max|weight| H + max|bias|)
    / T must stay below half its largest value (fp32: 1.7e38; fp64 for fp64 inputs)."""
    limit = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max / 2
    h, w, b = (0.0 if x is None else max(abs(x[0]), abs(x[1])) for x in bounds)
    dot = h * w * width + b
    if dot / temperature <= limit:
        return
    if dot <= limit:
        name, what = "temperature", f"temperature = {temperature:.3g} is so small that"
    else:
        name = "hidden" if h >= w else "weight"
        what = f"|{name}| up to {max(h, w):.3g} is so large that"
    raise ValueError(
        f"{name}: {what} the logits can overflow: (max|hidden| * max|weight| * H + max|bias|) / "
        f"temperature = {dot / temperature:.3g} must stay below {limit:.3g} (H = {width})"
    )


def _check_same_family(name: str, x, hidden) -> None:
    """fp64 goes with fp64 only (the gradcheck path); fp32/bf16/fp16 may mix (fp32 compute)."""
    if (x.dtype == torch.float64) != (hidden.dtype == torch.float64):
        raise ValueError(
            f"{name}: dtype {str(x.dtype).replace('torch.', '')} does not match hidden's "
            f"{str(hidden.dtype).replace('torch.', '')} "
            "(fp64 only with fp64; fp32/bf16/fp16 may mix)"
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
):
    """Log-probability of each target token under a linear LM head, exact and fused.

    With scaled logits ``z_ij = (hidden_i . weight_j + bias_j) / T``::

        logp_i    = z_{i,t_i} - log sum_j exp(z_ij)                 (t_i = targets[i])
        entropy_i = -sum_j p_ij log p_ij,   p_ij = softmax_j(z_ij)

    The [M, V] logits are never materialised: rows are processed in chunks whose [chunk, V]
    fp32 buffer is the only large temporary (extra memory O(chunk * V); the chunk is chosen from
    the shapes when ``chunk_size`` is None). Backward recomputes each chunk's logits and returns
    exact gradients w.r.t. hidden, weight and bias for both outputs (non-uniform upstream
    gradients welcome). Typical use: ``linear_logprobs(hidden[batch.logit_index], lm_head.weight,
    batch.action_ids)`` so that only action tokens are computed.

    Args:
        hidden: [M, H] fp32/bf16/fp16/fp64 hidden states (one row per predicted token).
        weight: [V, H] LM-head weight; fp64 only together with fp64 hidden.
        targets: [M] int64 (int32 accepted) token ids, each in [0, V).
        bias: optional [V] LM-head bias.
        temperature: T > 0; the logits are divided by it (as the sampler does).
        return_entropy: also return the entropy of each row's distribution (differentiable).
        chunk_size: rows per chunk (> 0), or None to choose it from the shapes. Results do not
            depend on it beyond floating-point summation order.
        impl: "auto", "torch", "triton" or "cpp".

    Returns:
        logp [M] (and entropy [M] when ``return_entropy``): fp32 for fp32/bf16/fp16 inputs
        (accumulated in fp32; bf16 values are upcast, not rounded), fp64 for fp64 inputs.

    Raises:
        ValueError: naming the argument (and index) for wrong shapes, dtypes, devices, targets
            out of [0, V), a NaN or inf entry of hidden, weight or bias, temperature <= 0,
            logits that could overflow the compute dtype ((max|hidden| max|weight| H +
            max|bias|) / temperature above half its largest value: NaN log-probs otherwise),
            or chunk_size <= 0. The value checks (targets range, finiteness) cost one ``aminmax``
            per tensor and one host transfer in all (one read of ``weight``: small next to the
            matmuls, which read it once per chunk); they are skipped under ``torch.compile``.

    Equivalent to::

        z = (hidden.float() @ weight.float().T + bias) / temperature
        logp = torch.log_softmax(z, -1).gather(-1, targets[:, None])[:, 0]
        entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    """
    _validate(hidden, weight, targets, bias, temperature, return_entropy, chunk_size)
    backend = resolve(impl, "linear_logprobs", hidden, weight, bias)
    return backend.linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=float(temperature),
        return_entropy=return_entropy,
        chunk_size=None if chunk_size is None else int(chunk_size),
    )
