"""Image generation for evaluation: N images per prompt with fixed seeds, base or base + adapter.

Use ``from medrl.sampling.generate import generate`` (the submodule shares the function's name,
so nothing is re-exported here; importing ``medrl.sampling`` stays cheap).
"""
