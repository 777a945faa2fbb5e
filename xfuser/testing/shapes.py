"""Synthetic "coloured shapes" data used to train and check the embedded default model.

Captions follow exactly one grammar::

    a {color} {shape} on a {color} background, {position}

with the shape colour different from the background colour.  Everything here is
generated in code (numpy only), so the data set, the held-out split and the pixel
checker are fully deterministic and need no downloads.
"""
from __future__ import annotations

import itertools
import random
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 175, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 35),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOR_NAMES: List[str] = list(COLORS)
SHAPES: List[str] = ["circle", "square", "triangle"]
POSITIONS: List[str] = ["top left", "top right", "bottom left", "bottom right", "center"]

# Shape centre as a fraction of the image side, (x, y).
_POS_XY = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}

WORDS: List[str] = sorted(
    set(["a", "on", "background"] + COLOR_NAMES + SHAPES + " ".join(POSITIONS).split())
)

HELDOUT_SEED = 1234
HELDOUT_FRACTION = 0.1


def make_caption(color: str, shape: str, bg: str, position: str) -> str:
    return f"a {color} {shape} on a {bg} background, {position}"


def parse_caption(caption: str) -> Dict[str, str]:
    """Inverse of :func:`make_caption` (raises ``ValueError`` on other text)."""
    text = caption.strip().lower()
    try:
        head, position = text.split(", ", 1)
        words = head.split()
        if len(words) != 7 or words[0] != "a" or words[3] != "on" or words[4] != "a" or words[6] != "background":
            raise ValueError
        color, shape, bg = words[1], words[2], words[5]
    except ValueError:
        raise ValueError(f"caption does not follow the grammar: {caption!r}") from None
    if color not in COLORS or bg not in COLORS or shape not in SHAPES or position not in POSITIONS:
        raise ValueError(f"caption uses unknown words: {caption!r}")
    return {"color": color, "shape": shape, "bg": bg, "position": position}


def all_triples() -> List[Tuple[str, str, str]]:
    """All (shape colour, shape, background colour) triples with colour != background (90)."""
    return [(c, s, b) for c, s, b in itertools.product(COLOR_NAMES, SHAPES, COLOR_NAMES) if c != b]


def heldout_triples() -> List[Tuple[str, str, str]]:
    """Deterministic ~10% of the triples that are never shown during training (9 of 90).

    Chosen so that every held-out triple's words all still occur in training
    (each colour/shape is seen in other combinations).
    """
    triples = all_triples()
    rng = random.Random(HELDOUT_SEED)
    order = triples[:]
    rng.shuffle(order)
    n = int(round(len(triples) * HELDOUT_FRACTION))
    chosen, used_pairs = [], set()
    for t in order:
        if len(chosen) == n:
            break
        # at most one held-out triple per (colour, bg) pair keeps every pair in training
        if (t[0], t[2]) in used_pairs:
            continue
        chosen.append(t)
        used_pairs.add((t[0], t[2]))
    return sorted(chosen)


def train_triples() -> List[Tuple[str, str, str]]:
    held = set(heldout_triples())
    return [t for t in all_triples() if t not in held]


def captions_for(triples: Iterable[Tuple[str, str, str]]) -> List[str]:
    return [make_caption(c, s, b, p) for (c, s, b) in triples for p in POSITIONS]


def train_captions() -> List[str]:
    return captions_for(train_triples())


def heldout_captions() -> List[str]:
    return captions_for(heldout_triples())


def is_heldout(caption: str) -> bool:
    p = parse_caption(caption)
    return (p["color"], p["shape"], p["bg"]) in set(heldout_triples())


def render(
    color: str,
    shape: str,
    bg: str,
    position: str,
    size: int = 64,
    rng: Optional[np.random.Generator] = None,
    supersample: int = 4,
) -> np.ndarray:
    """Render one image as a uint8 HxWx3 array.

    With ``rng`` the shape size varies a little (half-extent 0.14..0.19 of the side)
    and the centre jitters by up to 3% of the side; without it the canonical image.
    """
    if rng is None:
        half, jx, jy = 0.165, 0.0, 0.0
    else:
        half = float(rng.uniform(0.14, 0.19))
        jx, jy = rng.uniform(-0.03, 0.03, size=2)
    cx, cy = _POS_XY[position]
    cx, cy = cx + jx, cy + jy
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
    elif shape == "square":
        h = half * 0.9
        mask = (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    elif shape == "triangle":
        # upward isosceles triangle inscribed in the same box
        top, bottom = cy - half, cy + half
        t = np.clip((yy - top) / (bottom - top), 0.0, 1.0)
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= t * half)
    else:
        raise ValueError(shape)
    cover = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
    fg = np.array(COLORS[color], dtype=np.float32)
    bgc = np.array(COLORS[bg], dtype=np.float32)
    img = cover * fg + (1.0 - cover) * bgc
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_caption(caption: str, size: int = 64, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    p = parse_caption(caption)
    return render(p["color"], p["shape"], p["bg"], p["position"], size=size, rng=rng)


def sample_batch(
    n: int, rng: np.random.Generator, size: int = 64, captions: Optional[Sequence[str]] = None
) -> Tuple[np.ndarray, List[str]]:
    """``n`` random training images (uint8, N x H x W x 3) and their captions."""
    captions = list(captions) if captions is not None else train_captions()
    idx = rng.integers(0, len(captions), size=n)
    caps = [captions[i] for i in idx]
    imgs = np.stack([render_caption(c, size=size, rng=rng) for c in caps])
    return imgs, caps


# ----------------------------------------------------------------------------- checker
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)


def _nearest_color(rgb: np.ndarray) -> str:
    d = ((_PALETTE - rgb[None, :]) ** 2).sum(axis=1)
    return COLOR_NAMES[int(np.argmin(d))]


def _to_array(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.asarray(arr, dtype=np.float32)
        if arr.max() <= 1.0 + 1e-6:
            arr = arr * 255.0
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    return np.asarray(arr, dtype=np.float32)


def analyze_image(image, fg_threshold: float = 90.0) -> Dict[str, object]:
    """Read background colour, shape colour, position and a shape guess off an RGB image."""
    img = _to_array(image)
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    bg = _nearest_color(bg_rgb)
    dist = np.sqrt(((img - bg_rgb[None, None, :]) ** 2).sum(axis=-1))
    fg_mask = dist > fg_threshold
    out: Dict[str, object] = {"bg": bg, "color": None, "position": None, "shape": None,
                              "fg_fraction": float(fg_mask.mean())}
    if fg_mask.sum() < max(8, h * w // 400):
        return out
    out["color"] = _nearest_color(np.median(img[fg_mask], axis=0))
    ys, xs = np.nonzero(fg_mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    if abs(cx - 0.5) < 0.125 and abs(cy - 0.5) < 0.125:
        pos = "center"
    else:
        pos = ("top" if cy < 0.5 else "bottom") + " " + ("left" if cx < 0.5 else "right")
    out["position"] = pos
    # shape: fill ratio of the bounding box (square ~0.95+, circle ~0.79, triangle ~0.5)
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = fg_mask.sum() / float(bw * bh)
    out["fill"] = float(fill)
    out["shape"] = "square" if fill > 0.88 else ("circle" if fill > 0.64 else "triangle")
    return out


def check_image(image, caption: str) -> Dict[str, bool]:
    """Does ``image`` (PIL / HxWx3 array) show ``caption``?

    Returns ``bg_ok`` (border colour), ``color_ok`` (colour of pixels far from the
    background), ``position_ok`` (centroid of those pixels: quadrant or centre),
    ``shape_ok`` (bounding-box fill ratio; a rough guess) and ``ok`` =
    bg_ok and color_ok and position_ok.
    """
    want = parse_caption(caption)
    got = analyze_image(image)
    res = {
        "bg_ok": got["bg"] == want["bg"],
        "color_ok": got["color"] == want["color"],
        "position_ok": got["position"] == want["position"],
        "shape_ok": got["shape"] == want["shape"],
    }
    res["ok"] = res["bg_ok"] and res["color_ok"] and res["position_ok"]
    return res
