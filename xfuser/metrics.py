"""Quality of a cached output against the uncached output of the same seed.

Library metrics (scikit-image) on uint8-range RGB arrays, plus the relative L2 distance of
final latents. Identical images give PSNR = inf and SSIM = 1.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def to_array(image: Any) -> np.ndarray:
    """PIL image / HWC float array in [0, 1] / HWC uint8 -> float64 HWC in [0, 1]."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def psnr(image: Any, reference: Any) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    a, b = to_array(image), to_array(reference)
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=1.0))


def ssim(image: Any, reference: Any) -> float:
    from skimage.metrics import structural_similarity

    a, b = to_array(image), to_array(reference)
    win = min(7, min(a.shape[0], a.shape[1]) // 2 * 2 - 1)  # odd, fits small images
    return float(structural_similarity(b, a, data_range=1.0, channel_axis=-1, win_size=max(win, 3)))


def relative_l2(latent: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return float((latent.float() - reference).norm() / reference.norm().clamp_min(1e-12))


class LPIPSUnavailable(RuntimeError):
    """LPIPS needs torchvision and the AlexNet backbone weights; neither is downloaded here."""


ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def lpips_scorer():
    """A ``score(image, reference) -> float`` LPIPS (AlexNet, torchmetrics), or
    :class:`LPIPSUnavailable` saying what is missing. Never downloads: an offline machine
    gets a clear "skipped" reason instead of a hanging fetch."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("torchvision") is None:
        raise LPIPSUnavailable("skipped: no weights (torchvision, which LPIPS's AlexNet backbone needs, is not installed)")
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        raise LPIPSUnavailable(f"skipped: no weights (AlexNet backbone not found at {weights})")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)

    def score(image: Any, reference: Any) -> float:
        a, b = (torch.from_numpy(to_array(x)).permute(2, 0, 1)[None].float() for x in (image, reference))
        return float(metric(a, b))

    return score
