"""fedsd: privacy-preserving federated LoRA fine-tuning of diffusion models on Flower.

Kept import-light on purpose: a SuperNode starts a fresh ClientApp process for every
message, so torch and diffusers are imported only by the modules that need them.
"""

__version__ = "0.1.0"
