"""Hydra config groups that ship with the package: ``numerics/<preset>.yaml``, read by
``Numerics.preset`` and, through ``hydra.searchpath`` in configs/config.yaml, by ``train.py``."""
