"""medrl: RL fine-tuning of text-to-image diffusion models for medical images."""

__version__ = "0.1.0"
