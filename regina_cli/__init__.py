"""REGINA: regularised encoder with latent cycle-GAN for perturbation response prediction.

The package is importable without torch: heavy libraries are imported inside the engine
functions that need them, so `regina --help` stays instant.
"""

__version__ = "0.1.0"
