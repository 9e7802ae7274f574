"""Paper tables: rendering (render), published numbers (paper), builders (rl4med, cxrl)."""
