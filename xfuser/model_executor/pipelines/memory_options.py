"""xDiT's memory flags, applied through diffusers' own switches.

``--enable_tiling`` / ``--enable_slicing`` turn on the VAE's tiled / one-sample-at-a-time
decode (``vae.enable_tiling()`` / ``vae.enable_slicing()``). ``--enable_model_cpu_offload`` and
``--enable_sequential_cpu_offload`` hand placement to diffusers' accelerate hooks instead of
``pipe.to(device)``: whole models (or every submodule) move to the accelerator only while they
run. All of it is checked before weights move, so a flag that cannot act here is refused,
never ignored.
"""
from __future__ import annotations

import torch

from xfuser.config.config import ConfigError, RuntimeConfig

_OFFLOAD_FLAG = {"model": "--enable_model_cpu_offload", "sequential": "--enable_sequential_cpu_offload"}


def check_memory_options(pipe, runtime: RuntimeConfig, device: torch.device, use_parallel_vae: bool = False) -> None:
    """Refuse what cannot work, naming the flag (called before anything is placed or computed)."""
    vae = getattr(pipe, "vae", None)
    for on, flag, method in ((runtime.vae_tiling, "--enable_tiling", "enable_tiling"), (runtime.vae_slicing, "--enable_slicing", "enable_slicing")):
        if not on:
            continue
        if vae is None or not callable(getattr(vae, method, None)):
            raise ConfigError(f"{flag}: {type(vae).__name__ if vae is not None else 'this pipeline'} has no {method}(); drop the flag")
        if use_parallel_vae:
            raise ConfigError(f"{flag} and --use_parallel_vae both change how the VAE decodes; choose one")
    if runtime.cpu_offload != "none":
        flag = _OFFLOAD_FLAG[runtime.cpu_offload]
        if device.type == "cpu":
            raise ConfigError(f"{flag} moves models to a GPU while they run, but this process computes on the CPU, where they already live; drop the flag")
        if getattr(pipe, "model_cpu_offload_seq", None) is None and runtime.cpu_offload == "model":
            raise ConfigError(f"{flag}: {type(pipe).__name__} declares no model offload order; use --enable_sequential_cpu_offload")


def place_pipeline(pipe, runtime: RuntimeConfig, device: torch.device) -> None:
    """Put the pipeline on ``device`` (or install diffusers' offload hooks for it) and switch
    on the VAE options. Offload to a CPU ``device`` is allowed here so tests can exercise the
    hooks; :func:`check_memory_options` keeps users from asking for it."""
    if runtime.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif runtime.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    vae = getattr(pipe, "vae", None)
    if runtime.vae_tiling:
        vae.enable_tiling()
    if runtime.vae_slicing:
        vae.enable_slicing()
