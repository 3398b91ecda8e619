"""Interventions on a run's LM through its SAEs' features (paper-spec §6.4–6.5): feature edits
(clamp, scale, zero) at the SAE's layer with the SAE's error term kept (edit.py), and KV-cached
sampling with or without edits (decode.py). Opened runs come from `monojax.run.Run`."""
from monojax.interventions.decode import generate
from monojax.interventions.edit import (
    MODES,
    Edit,
    EditArrays,
    Shift,
    edit_arrays,
    feature_shift,
    intervened_logits,
)

__all__ = ["MODES", "Edit", "EditArrays", "Shift", "edit_arrays", "feature_shift", "generate", "intervened_logits"]
