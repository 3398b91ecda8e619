"""Toy superposition run: every SAE recipe on synthetic sparse features with a known ground truth,
scored by the share of true features recovered. No data or LM; under a minute on 2 CPU cores.

  python -m monojax.main --config=configs/toy.py [--config.sae.saes=256:0.02:2023,...]
"""
from monojax.config import base_config
from monojax.sae.toy import toy_config, toy_sae_config


def get_config():
  c = base_config()
  c.name = "toy"
  c.mode = "toy"          # the main entry runs monojax.sae.toy.run_toy instead of LM training
  c.toy = toy_config()    # fields documented in monojax/sae/toy.py
  c.sae = toy_sae_config()  # the sae section (monojax/sae/config.py) with toy-sized SAEs and lrs
  return c
