"""The dominant eigenvalue of the alpha loss's Hessian, R-DARTS's collapse indicator
(Zela et al., "Understanding and robustifying differentiable architecture search", 2020):
it grows as the search heads for the sharp minima that parameter-free cells sit in.

Power iteration on Hessian-vector products (double backward), so the Hessian is never formed.
"""

from __future__ import annotations

import math

import torch


def dominant_eigenvalue(loss: torch.Tensor, params: list[torch.Tensor], iterations: int,
                        *, generator: torch.Generator | None = None) -> float:
    """The eigenvalue of largest magnitude of d2 loss / d params2, by ``iterations`` steps of
    power iteration from a random start (drawn from ``generator``, on the host). ``loss`` must
    have been computed with a graph to ``params``; the graph is kept between iterations.

    Args:
        loss: a scalar computed with a graph to ``params``.
        params: the parameters (alpha).
        iterations: power-iteration steps.
        generator: draws the random start (on the host).
    """
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # A gradient that does not depend on the parameters (a term linear in them, or none at all)
    # contributes a zero block to the Hessian.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    vector = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]
    norm = math.sqrt(sum(float(v.square().sum()) for v in vector))
    vector = [v / norm for v in vector]
    eigenvalue = 0.0
    for _ in range(iterations):
        product = [torch.zeros_like(p) for p in params]
        if live:
            parts = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[vector[i] for i in live],
                                        retain_graph=True, allow_unused=True)
            product = [q if q is not None else z for q, z in zip(parts, product)]
        eigenvalue = sum(float((h * v).sum()) for h, v in zip(product, vector))   # Rayleigh quotient
        norm = math.sqrt(sum(float(h.square().sum()) for h in product))
        if norm == 0.0 or not math.isfinite(norm):
            return 0.0 if norm == 0.0 else float("nan")
        vector = [h / norm for h in product]
    return eigenvalue
