"""ConsisID identity-preserving text-to-video with caching, CFG parallel and USP.

    torchrun --nproc_per_node=2 examples/consisid_example.py --model BestWishYsh/ConsisID-preview \
        --face_image face.png --num_frames 49 --height 480 --width 720 --ulysses_degree 2 --cache_method Fast

The identity comes from one of (see ``xfuser.model_executor.pipelines.consisid_inputs.py``):

* ``--face_image PATH`` (upstream spelling: ``--img_file_path``): through ConsisID's face models
  (diffusers' ``consisid_utils``: insightface, facexlib, consisid_eva_clip and torchvision must be
  installed, their weights under ``<model>/face_encoder``); refused before the model loads when
  they are not installed;
* ``--face_embeddings FILE``: a ``torch.save``d dict with ``image``, ``id_cond``,
  ``id_vit_hidden`` (and optionally ``kps_cond``) computed elsewhere;
* neither: a generated synthetic face (a drawn face image, seeded embeddings shaped by the
  transformer's config), logged as such: the run works, its identity means nothing.

The face inputs are prepared once, before the ranks start generating, and are identical on
every rank. Writes a GIF per prompt.
"""
from __future__ import annotations

import argparse
from typing import Any

from diffusers import ConsisIDPipeline

from xfuser.cli import exit_with_error, run_example
from xfuser.config.config import ConfigError
from xfuser.model_executor.pipelines.consisid_inputs import add_face_args, check_face_args, face_call_inputs


def face_inputs(ns: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    return face_call_inputs(pipe, face_image=ns.face_image, face_embeddings=ns.face_embeddings, model=ns.model,
                            height=ns.height, width=ns.width, seed=ns.seed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # the face flags are checked before run_example loads anything: a face image without the
    # face models is one `error:` line, not a failure after minutes of loading
    pre = argparse.ArgumentParser(add_help=False)
    add_face_args(pre)
    known, _ = pre.parse_known_args(argv)
    try:
        check_face_args(known.face_image, known.face_embeddings)
    except ConfigError as exc:
        exit_with_error(exc)
    return run_example(ConsisIDPipeline, "consisid", argv, description=__doc__, add_args=add_face_args,
                       call_inputs=face_inputs)


if __name__ == "__main__":
    main()
