"""Multi-host start-up: `jax.distributed.initialize` when the config or the environment says so.

  - explicit: distributed.coordinator_address (+ num_processes, process_id) from the config, or the
    environment variables MONOJAX_COORDINATOR, MONOJAX_NUM_PROCESSES, MONOJAX_PROCESS_ID
    (what launch/local.sh sets);
  - Cloud TPU VMs and Slurm: jax detects everything itself, so initialize() is called bare;
  - otherwise: a single process, nothing to do.
"""
from __future__ import annotations

import logging
import os

import jax

from monojax import errors


def _env_int(name: str, default: int) -> int:
  v = os.environ.get(name, "")
  return int(v) if v.strip() else default


def maybe_initialize(dist_cfg, log=logging.info) -> bool:
  """Initialises jax.distributed if configured; returns True when it did."""
  addr = dist_cfg.coordinator_address or os.environ.get("MONOJAX_COORDINATOR", "")
  if addr:
    num = dist_cfg.num_processes or _env_int("MONOJAX_NUM_PROCESSES", 0)
    pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else _env_int("MONOJAX_PROCESS_ID", -1)
    if num <= 0 or pid < 0:
      raise errors.ConfigError("distributed.coordinator_address is set: also set distributed.num_processes and "
                       "distributed.process_id (or MONOJAX_NUM_PROCESSES / MONOJAX_PROCESS_ID)")
    local = [int(x) for x in dist_cfg.local_device_ids.split(",") if x.strip()] or None
    jax.distributed.initialize(coordinator_address=addr, num_processes=num, process_id=pid, local_device_ids=local)
  elif os.environ.get("SLURM_NTASKS", "1") not in ("", "1") or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()  # Slurm job with several tasks, or a multi-host TPU slice: auto-detected
  else:
    return False
  log(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
      f"{jax.local_device_count()} local / {jax.device_count()} global devices")
  return True
