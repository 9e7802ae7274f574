"""Models: the diffusion stack (tiny_sd, vae_train, latents, finetune) and the reward /
metric networks.

Nothing is imported here on purpose: torch, diffusers and transformers are heavy, so callers
import the submodule they need (``from medrl.models.tiny_sd import load_components``).
"""
