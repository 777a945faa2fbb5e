"""ConsisID identity-preserving text-to-video with caching, CFG parallel and USP.

    torchrun --nproc_per_node=2 examples/consisid_example.py --model BestWishYsh/ConsisID-preview \
        --img_file_path face.png --num_frames 49 --height 480 --width 720 --ulysses_degree 2 --cache_method Fast

The identity comes from a face image through ConsisID's face models (diffusers'
``consisid_utils``: insightface, facexlib and consisid_eva_clip must be installed, their weights
under ``<model>/face_encoder``), or from ``--face_embeddings`` — a ``torch.save``d dict with
``id_cond``, ``id_vit_hidden``, ``image`` (and optionally ``kps_cond``) computed elsewhere.
The face inputs are prepared once, before the ranks start generating, and are identical on
every rank. Writes a GIF per prompt.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from diffusers import ConsisIDPipeline

from xfuser.cli import run_example
from xfuser.config.config import ConfigError


def add_args(parser: argparse.ArgumentParser) -> None:
    face = parser.add_mutually_exclusive_group(required=True)
    face.add_argument("--img_file_path", help="reference face image (needs ConsisID's face models)")
    face.add_argument("--face_embeddings", help="torch file with id_cond, id_vit_hidden, image [, kps_cond]")


def face_inputs(ns: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    if ns.face_embeddings:
        data = torch.load(ns.face_embeddings, map_location="cpu", weights_only=False)
        missing = [k for k in ("id_cond", "id_vit_hidden", "image") if k not in data]
        if missing:
            raise ConfigError(f"--face_embeddings {ns.face_embeddings} lacks {missing}")
        return {k: data[k] for k in ("id_cond", "id_vit_hidden", "image", "kps_cond") if k in data}
    try:
        from diffusers.pipelines.consisid.consisid_utils import prepare_face_models, process_face_embeddings_infer
    except ImportError as exc:
        raise ConfigError(
            f"--img_file_path needs ConsisID's face models ({exc}); install insightface, facexlib and "
            "consisid_eva_clip, or pass precomputed --face_embeddings"
        ) from exc
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    helper_1, helper_2, clip, mean, std, app = prepare_face_models(str(Path(ns.model) / "face_encoder"), device, dtype)
    id_cond, id_vit_hidden, image, kps = process_face_embeddings_infer(
        helper_1, clip, helper_2, mean, std, app, device, dtype, ns.img_file_path, is_align_face=True,
    )
    return {"id_cond": id_cond, "id_vit_hidden": id_vit_hidden, "image": image, "kps_cond": kps}


if __name__ == "__main__":
    run_example(ConsisIDPipeline, "consisid", description=__doc__, add_args=add_args, call_inputs=face_inputs)
