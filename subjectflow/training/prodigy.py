"""Prodigy: Adam whose step size is estimated as it trains (Mishchenko & Defazio, "Prodigy:
An Expeditiously Adaptive Parameter-Free Learner", arXiv 2306.06101, Algorithm 4, the Adam
form). The SFO paper trains with it; this is the paper's algorithm as its authors' package
`prodigyopt` runs it (one process, no FSDP), written here because that package is not
installable on every machine this runs on.

The learning rate is a multiplier on the estimate d (leave it at 1.0); d starts at d0 and
grows with the ratio of the weighted gradient-displacement sum to the sum of |s|:

    r_k = beta3·r_{k-1} + (d_k/d0)·d_k·lr·<g_k, x0 - x_k>
    s_k = beta3·s_{k-1} + (d_k/d0)·d_k·lr·g_k          (d_k·g_k with `safeguard_warmup`)
    d_{k+1} = max(d_k, d_coef·r_k / ||s_k||_1)
    m, v: Adam moments of d_k·g_k;  x_{k+1} = x_k - d_k·lr·m / (sqrt(v) + d_{k+1}·eps)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class Prodigy(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0, d0: float = 1e-6,
                 d_coef: float = 1.0, safeguard_warmup: bool = False) -> None:
        if not (lr > 0 and d0 > 0 and eps > 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Prodigy needs lr, d0, eps > 0 and betas in [0, 1); got lr={lr}, d0={d0}, "
                             f"eps={eps}, betas={betas}")
        defaults = dict(lr=lr, betas=betas, beta3=math.sqrt(betas[1]) if beta3 is None else beta3, eps=eps,
                        weight_decay=weight_decay, d0=d0, d_coef=d_coef, safeguard_warmup=safeguard_warmup,
                        d=d0, d_max=d0, d_numerator=0.0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer's signature
        loss = closure() if closure is not None else None
        # d is one number for the whole model: every group shares it, as in the paper.
        first = self.param_groups[0]
        d, d0, d_max, lr = first["d"], first["d0"], first["d_max"], max(g["lr"] for g in self.param_groups)
        beta1, beta2 = first["betas"]
        beta3, dlr = first["beta3"], d * lr
        numerator_terms, denominator_terms, stepped = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if not state:
                    state.update(step=0, s=torch.zeros_like(p), p0=p.detach().clone(),
                                 exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                numerator_terms.append((d / d0) * dlr * torch.dot(grad.flatten(), (state["p0"] - p).flatten()))
                state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
                state["s"].mul_(beta3).add_(grad, alpha=(d / d0) * (d if group["safeguard_warmup"] else dlr))
                denominator_terms.append(state["s"].abs().sum())
                stepped.append((group, p, state))
        if not stepped:
            return loss
        # One device sync for the two sums, not two per parameter.
        delta, denominator = torch.stack([torch.stack(numerator_terms).sum().float(),
                                          torch.stack(denominator_terms).sum().float()]).tolist()
        if denominator == 0:  # every gradient is zero: nothing to learn from, nothing moves
            return loss
        numerator = first["d_numerator"] * beta3 + delta
        d_hat = first["d_coef"] * numerator / denominator
        d = d_max = max(d_max, d_hat)  # the estimate only grows (the package's default, no growth cap)
        for group in self.param_groups:
            group.update(d=d, d_max=d_max, d_numerator=numerator)
        for group, p, state in stepped:
            state["step"] += 1
            if group["weight_decay"]:  # decoupled, as AdamW
                p.add_(p, alpha=-group["weight_decay"] * dlr)
            p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(d * group["eps"]), value=-dlr)
        return loss
