"""Sparse autoencoders as pure, jittable functions over plain pytrees (paper-spec §3-§5, §9).

  core     specs, groups (vmapped λ sweeps), init_state, update, maybe_resample, encode/reconstruct,
           shardings
  recipes  the 2023, April-2024 and TopK rules
  resample 2023 dead-feature resampling
  metrics  fp32 metrics, density statistics and histogram
  toy      synthetic superposition data and feature-recovery runs
  config   the `sae` config section
"""
from monojax.sae.config import sae_config
from monojax.sae.core import (Group, SAESpec, decoder_directions, density, encode, init_state, make_groups,
                              make_resample_fn, make_update_fn, maybe_resample, parse_specs, reconstruct,
                              resample_steps, shardings, update)

__all__ = ["Group", "SAESpec", "decoder_directions", "density", "encode", "init_state", "make_groups",
           "make_resample_fn", "make_update_fn", "maybe_resample", "parse_specs", "reconstruct", "resample_steps",
           "sae_config", "shardings", "update"]
