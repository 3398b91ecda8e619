"""Sparse autoencoders as a library of pure, jittable functions over plain pytrees; nothing here
imports the training side (docs/paper-notes.md §3-§5 for the recipes and metrics).

  catalogue  specs, groups (vmapped λ sweeps) and the typed `SAE` records of a run
  recipes    the 2023, April-2024 and TopK rules, one object each
  core       init_state, update, maybe_resample, encode/reconstruct, shardings
  buffer     the on-device mixing buffer
  resample   2023 dead-feature resampling
  metrics    fp32 metrics, density statistics and histogram
  sparse     the exact sparse ReLU-SAE update (CPU kernels)
  toy        synthetic superposition data and feature-recovery runs
  config     the `sae` config section
"""
from monojax.sae.catalogue import SAE, Group, SAESpec, make_groups, parse_specs
from monojax.sae.config import sae_config
from monojax.sae.core import (decoder_directions, density, encode, init_state, make_resample_fn, make_update_fn,
                              maybe_resample, reconstruct, resample_steps, shardings, update)

__all__ = ["SAE", "Group", "SAESpec", "decoder_directions", "density", "encode", "init_state",
           "make_groups", "make_resample_fn", "make_update_fn", "maybe_resample", "parse_specs", "reconstruct",
           "resample_steps", "sae_config", "shardings", "update"]
