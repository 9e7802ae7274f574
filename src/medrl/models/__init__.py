"""The reward and evaluator networks: artifact classifiers, posture aligner, XRV diagnostic
classifier, dual encoder, and their shared training helpers (training.py).

Nothing is imported here on purpose: torch, torchvision and transformers are heavy, so callers
import the submodule they need (``from medrl.models.posture import load_aligner``).
"""
