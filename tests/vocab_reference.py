"""float64 reference for the vocab-parallel op, shared by the CPU tests and the GPU check."""

import torch


def reference(x, t, temp):
    """Log-prob of ``t`` and entropy of softmax(x / temp) in float64, written so that confident
    tokens do not cancel either."""
    z = x.double() / temp
    m, arg = z.max(-1, keepdim=True)
    rest = torch.exp(z - m).scatter(-1, arg, 0.0).sum(-1, keepdim=True)
    logp = (z - m) - torch.log1p(rest)
    p = logp.exp()
    # 0 log 0 = 0 for -inf logits; where() on the log, not the product, keeps the gradient finite
    plogp = p * torch.where(p > 0, logp, 0.0)
    return logp.gather(-1, t.unsqueeze(-1)).squeeze(-1), -plogp.sum(-1)
