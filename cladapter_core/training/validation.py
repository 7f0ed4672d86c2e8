"""Mean loss, labels and probabilities of a model over a loader: the validation of every
epoch, and what compare scores methods with."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F


# -- evaluation on a split -----------------------------------------------------------------
@torch.no_grad()
def run_eval(model, loader, device, amp_dtype=None, forward=None) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, labels and probabilities of the model over a loader."""
    model.eval()
    forward = forward or model
    losses, labels, probs = [], [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device)
        with _autocast(device, amp_dtype):
            logits = forward(x)
        losses.append(F.cross_entropy(logits.float(), y, reduction="sum").item())
        labels.append(y.cpu())
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    n = sum(len(y) for y in labels)
    return (sum(losses) / max(n, 1), torch.cat(labels).numpy() if labels else np.zeros(0),
            torch.cat(probs).numpy() if probs else np.zeros((0, 0)))


def _autocast(device: torch.device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
