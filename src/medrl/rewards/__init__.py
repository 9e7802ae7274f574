"""Reward functions (ISIC artifact classifier reward, CXRL align/diag/consist rewards).

Nothing is imported here on purpose: import the submodule you need
(``from medrl.rewards.cxr import CXRReward``) so that light callers do not pay for torch
models they never use.
"""
