"""ConsisID's face inputs for the command-line scripts: from a face image, a saved file, or generated.

ConsisIDPipeline takes, besides the prompt, ``image`` (the first-frame condition: the aligned
face crop), ``id_cond`` (the antelopev2 + EVA-CLIP identity vector, ``(1, LFE_id_dim)``),
``id_vit_hidden`` (``LFE_num_scale`` EVA-CLIP hidden-state maps, each ``(1, tokens, LFE_vit_dim)``)
and, for a transformer with ``is_kps``, ``kps_cond`` (5 facial keypoints in image pixels).

Three sources, in the order the scripts try them:

* ``--face_image`` (upstream spelling ``--img_file_path``): through diffusers' ``consisid_utils``,
  which needs insightface, facexlib, consisid_eva_clip and torchvision plus the checkpoint's
  ``face_encoder/`` weights. A face image alone cannot give the identity embeddings, so without
  those packages the run is refused before the model loads (:func:`check_face_args`).
* ``--face_embeddings``: a ``torch.save``d dict of the inputs above, checked against the
  transformer's config before compute.
* neither: :func:`generated_face_inputs` draws a cartoon face and draws the embeddings from a
  seeded generator, shaped by the transformer's config, and logs one line saying so: the
  command runs (speed, caching and parallelism are measured as usual), its identity means nothing.

Why here and not in the scripts: the example and the video benchmark take the same flags and
must make the same inputs for the same seed.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch

from xfuser.config.config import ConfigError
from xfuser.logger import init_logger
from xfuser.model_executor.pipelines.call_args import native_size

logger = init_logger(__name__)

FACE_KEYS = ("image", "id_cond", "id_vit_hidden", "kps_cond")
# what diffusers' consisid_utils imports (torchvision: its resize/normalize of the face crop)
FACE_MODEL_PACKAGES = ("insightface", "facexlib", "consisid_eva_clip", "torchvision")
# EVA02-CLIP-L/14 at 336 px, the face ViT ConsisID was trained with: 24 x 24 patches + CLS token
VIT_TOKENS = 577


def add_face_args(parser: argparse.ArgumentParser) -> None:
    """The face flags, shared by examples/consisid_example.py and benchmark/video_cache_execute.py."""
    face = parser.add_mutually_exclusive_group()
    face.add_argument("--face_image", "--img_file_path", dest="face_image", default=None, metavar="PATH",
                      help="reference face image (needs ConsisID's face models: " + ", ".join(FACE_MODEL_PACKAGES) + ")")
    face.add_argument("--face_embeddings", default=None, metavar="PATH",
                      help="torch file with image, id_cond, id_vit_hidden [, kps_cond] computed elsewhere. "
                           "Without a face flag a synthetic face is generated (the run works, identity means nothing)")


def missing_face_packages() -> list[str]:
    return [name for name in FACE_MODEL_PACKAGES if importlib.util.find_spec(name) is None]


def check_face_args(face_image: str | None, face_embeddings: str | None) -> None:
    """Pre-load checks of the face flags: the files exist, and a face image has the face models to read it."""
    for flag, path in (("--face_image/--img_file_path", face_image), ("--face_embeddings", face_embeddings)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if face_image is not None:
        missing = missing_face_packages()
        if missing:
            raise ConfigError(
                f"--face_image {face_image}: turning a face image into ConsisID's identity embeddings needs its face "
                f"models, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
                f"pip install {' '.join(missing)}, or pass precomputed --face_embeddings FILE, or no face flag "
                "(a generated synthetic face)"
            )


def is_consisid(pipe: Any) -> bool:
    return type(pipe).__name__ == "ConsisIDPipeline"


def _face_config(pipe: Any) -> dict[str, Any]:
    config = pipe.transformer.config
    return {
        "train_face": bool(getattr(config, "is_train_face", False)),
        "kps": bool(getattr(config, "is_kps", False)),
        "id_dim": int(getattr(config, "LFE_id_dim", 1280)),
        "vit_dim": int(getattr(config, "LFE_vit_dim", 1024)),
        "scales": int(getattr(config, "LFE_num_scale", 5)),
    }


def draw_face(height: int, width: int):
    """A deterministic cartoon face filling the frame, and its 5 keypoints (eyes, nose tip, mouth
    corners, insightface's order) in pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (70, 110, 160))
    draw = ImageDraw.Draw(image)
    cx, cy, rx, ry = width / 2, height * 0.52, width * 0.30, height * 0.38

    def box(x: float, y: float, ax: float, ay: float) -> list[float]:
        return [x - ax, y - ay, x + ax, y + ay]

    draw.ellipse(box(cx, cy - ry * 0.35, rx * 1.08, ry * 0.85), fill=(60, 40, 25))  # hair
    draw.ellipse(box(cx, cy, rx, ry), fill=(230, 190, 160))  # skin
    eyes = [(cx - rx * 0.40, cy - ry * 0.18), (cx + rx * 0.40, cy - ry * 0.18)]
    for x, y in eyes:
        draw.ellipse(box(x, y, rx * 0.16, ry * 0.08), fill=(255, 255, 255))
        draw.ellipse(box(x, y, rx * 0.07, ry * 0.07), fill=(40, 60, 90))
    nose = (cx, cy + ry * 0.12)
    draw.polygon([(cx, cy - ry * 0.10), (cx - rx * 0.10, nose[1]), (cx + rx * 0.10, nose[1])], fill=(200, 150, 125))
    mouth = [(cx - rx * 0.35, cy + ry * 0.45), (cx + rx * 0.35, cy + ry * 0.45)]
    draw.chord([mouth[0][0], cy + ry * 0.30, mouth[1][0], cy + ry * 0.60], 0, 180, fill=(170, 60, 70))
    return image, np.array([*eyes, nose, *mouth], dtype=np.float32)


def generated_face_inputs(pipe: Any, height: int | None = None, width: int | None = None, seed: int = 42) -> dict[str, Any]:
    """Inputs of the right shapes for ``pipe``'s transformer: a drawn face at the call's size and
    embeddings from ``torch.Generator().manual_seed(seed)`` (same seed, same inputs on every rank).
    Logs one line naming what was generated."""
    face = _face_config(pipe)
    if height is None or width is None:
        native = native_size(pipe)
        height, width = height or native[0], width or native[1]
    image, kps = draw_face(height, width)
    inputs: dict[str, Any] = {"image": image}
    parts = [f"a drawn {height}x{width} (height x width) cartoon face image"]
    if face["train_face"]:
        g = torch.Generator().manual_seed(seed)
        inputs["id_cond"] = torch.randn(1, face["id_dim"], generator=g)
        inputs["id_vit_hidden"] = [torch.randn(1, VIT_TOKENS, face["vit_dim"], generator=g) for _ in range(face["scales"])]
        parts.append(f"random id_cond (1, {face['id_dim']}) and {face['scales']} random id_vit_hidden maps "
                     f"(1, {VIT_TOKENS}, {face['vit_dim']}) from seed {seed}")
    if face["kps"]:
        inputs["kps_cond"] = kps
        parts.append("the drawing's 5 keypoints as kps_cond")
    logger.info("ConsisID face: no --face_image or --face_embeddings given, so generated %s; the video runs, but its "
                "identity preservation is meaningless", ", ".join(parts))
    return inputs


def load_face_embeddings(path: str, pipe: Any) -> dict[str, Any]:
    """A ``--face_embeddings`` file, checked against the transformer's config before compute."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)  # may hold a PIL image
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user error
        raise ConfigError(f"--face_embeddings {path}: cannot be read by torch.load ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--face_embeddings {path}: holds a {type(data).__name__}, not a dict of {FACE_KEYS}")
    face = _face_config(pipe)
    required = ["image", *(["id_cond", "id_vit_hidden"] if face["train_face"] else [])]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"--face_embeddings {path}: lacks {missing}; it needs {required} (kps_cond optional)")
    if face["train_face"]:
        id_cond, vit = data["id_cond"], data["id_vit_hidden"]
        if not isinstance(id_cond, torch.Tensor) or id_cond.shape[-1] != face["id_dim"]:
            raise ConfigError(f"--face_embeddings {path}: id_cond must be a tensor (1, {face['id_dim']}) for this "
                              f"transformer (LFE_id_dim), got {getattr(id_cond, 'shape', type(id_cond).__name__)}")
        if (not isinstance(vit, (list, tuple)) or len(vit) != face["scales"]
                or any(not isinstance(t, torch.Tensor) or t.shape[-1] != face["vit_dim"] for t in vit)):
            raise ConfigError(f"--face_embeddings {path}: id_vit_hidden must be a list of {face['scales']} tensors "
                              f"(1, tokens, {face['vit_dim']}) for this transformer (LFE_num_scale, LFE_vit_dim)")
    return {k: data[k] for k in FACE_KEYS if k in data}


def _face_encoder_root(model: str | None) -> str:
    """The checkpoint folder holding ``face_encoder/`` (a hub id is fetched, face_encoder only)."""
    if model is None:
        raise ConfigError("--face_image needs a ConsisID checkpoint with face_encoder/ weights; pass --model DIR")
    if Path(model).is_dir():
        if not (Path(model) / "face_encoder").is_dir():
            raise ConfigError(f"--face_image: --model {model} has no face_encoder/ folder (ConsisID's face model weights)")
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, allow_patterns=["face_encoder/*", "face_encoder/**/*"])
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo: one user error
        raise ConfigError(f"--face_image: cannot fetch face_encoder/ of --model {model} ({exc}); pass --model DIR "
                          "with a local checkpoint, or --face_embeddings") from exc


def face_inputs_from_image(pipe: Any, path: str, model: str | None) -> dict[str, Any]:
    """The face models of diffusers' consisid_utils on ``path`` (after :func:`check_face_args`)."""
    from diffusers.pipelines.consisid.consisid_utils import prepare_face_models, process_face_embeddings_infer

    root = _face_encoder_root(model)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    helper_1, helper_2, clip, app, mean, std = prepare_face_models(root, device, dtype)
    id_cond, id_vit_hidden, image, kps = process_face_embeddings_infer(
        helper_1, clip, helper_2, mean, std, app, device, dtype, path, is_align_face=True,
    )
    logger.info("ConsisID face: %s through the face models of %s/face_encoder", path, root)
    return {"id_cond": id_cond, "id_vit_hidden": id_vit_hidden, "image": image, "kps_cond": kps}


def face_call_inputs(pipe: Any, face_image: str | None = None, face_embeddings: str | None = None,
                     model: str | None = None, height: int | None = None, width: int | None = None,
                     seed: int = 42) -> dict[str, Any]:
    """ConsisID's face call arguments from whichever face flag was given, else generated ones."""
    if face_embeddings is not None:
        return load_face_embeddings(face_embeddings, pipe)
    if face_image is not None:
        return face_inputs_from_image(pipe, face_image, model)
    return generated_face_inputs(pipe, height, width, seed)
