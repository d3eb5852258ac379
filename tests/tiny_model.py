"""The small model the inference tests score: a narrow trunk and large head weights, so that predictions differ
from image to image and class to class (a freshly initialised head predicts nearly the same for everything)."""

from __future__ import annotations

import torch

from fbn_fast.model import build_model


def tiny_model(seed: int = 0, heads: tuple[str, ...] = ("expr_head", "au_head", "va_head"),
               bias_std: float = 0.0) -> torch.nn.Module:
    """``small`` trunk of width 4; the weights of ``heads`` ~ N(0, 2), their biases ~ N(0, bias_std) if > 0."""
    torch.manual_seed(seed)
    model = build_model("small", trunk_kwargs={"width": 4})
    with torch.no_grad():
        for name in heads:
            head = getattr(model, name)
            head.weight.normal_(0.0, 2.0)
            if bias_std:
                head.bias.normal_(0.0, bias_std)
    return model.eval()
