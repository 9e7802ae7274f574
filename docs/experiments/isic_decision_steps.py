"""Which DDIM steps decide what the H=6 reward judge sees (NOTEBOOK ISIC-13).

For trajectories of the SD baseline on the 32 evaluation prompts, the state x_k after k of the
sampling steps is kept and the remaining steps are redrawn with fresh noise R times. Per head,
the share of the prediction's variance that x_k already fixes is 1 - E[Var(y | x_k)] / Var(y);
its rise between two k is what the step noise in between decides (the only part DDPO's policy
gradient can act on; x_T is not an action). The last line gives the share of the reward's
variance within a prompt that x_T alone fixes. ``--head hair``: the same share for that head
within each lesion's prompts that ask for it (ISIC-14: does x_T or the condition carry the
planted combination?).

    python docs/experiments/isic_decision_steps.py <workspace> [--n 4] [--repeats 4] [--branch 0 2 4 6 8] [--head hair]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medrl.data.prompts import evaluation_prompts, prompt_to_labels
from medrl.diffusion.ddim import ddim_step_with_logprob
from medrl.diffusion.rollout import decode_latents, guided_eps, initial_latents
from medrl.diffusion.stack import encode_prompts, load_components
from medrl.rewards.isic import ArtifactReward

NUM_STEPS, GUIDANCE, ETA = 10, 5.0, 1.0  # rl.common of the default


def denoise(c, latents, steps, cond, neg, generator):
    for t in steps:
        eps = guided_eps(c.unet, latents, t, cond, neg.expand(len(latents), -1, -1), GUIDANCE)
        latents, _ = ddim_step_with_logprob(c.scheduler, eps, t, latents, eta=ETA, generator=generator)
    return latents


def judge_continuations(workspace: Path, n: int, repeats: int, branch: list[int]):
    """(preds, rewards): preds[k] (n, P, R, H) 0/1 judge outputs of R continuations from x_k;
    rewards[k] (n, P, R) the H=6 reward of the same images."""
    c = load_components(str(workspace / "data/models/isic/base"))
    judge = ArtifactReward(workspace / "data/models/isic/clf_h6")
    prompts = evaluation_prompts()
    cond, neg = encode_prompts(c, prompts).float(), encode_prompts(c, [""]).float()
    c.scheduler.set_timesteps(NUM_STEPS)
    steps = c.scheduler.timesteps
    preds = {k: [] for k in branch}
    rewards = {k: [] for k in branch}
    with torch.no_grad():
        for i in range(n):
            g = torch.Generator().manual_seed(100 + i)
            states = [initial_latents(c.unet, len(prompts), g)]
            for t in steps:
                states.append(denoise(c, states[-1], [t], cond, neg, g))
            for k in branch:
                p_k, r_k = [], []
                for r in range(repeats):
                    gr = torch.Generator().manual_seed(10_000 * (i + 1) + 100 * k + r)
                    images = decode_latents(c.vae, denoise(c, states[k].clone(), steps[k:], cond, neg, gr))
                    p_k.append((judge.probs(images) > 0.5).float())
                    r_k.append(judge(images, prompts)[0])
                preds[k].append(torch.stack(p_k, 1))
                rewards[k].append(torch.stack(r_k, 1))
            print(f"trajectory set {i + 1}/{n}", flush=True)
    return judge.heads, {k: torch.stack(v) for k, v in preds.items()}, {k: torch.stack(v) for k, v in rewards.items()}


def print_asked_shares(heads: list[str], preds: dict, head: str) -> None:
    """Per lesion, over its prompts asking for ``head``: the judge's rate, and the share of that
    head's within-prompt variance fixed by x_k."""
    j = heads.index(head)
    labels = [prompt_to_labels(p) for p in evaluation_prompts()]
    for lesion in ("MEL", "NV"):
        idx = [i for i, lab in enumerate(labels) if lab[lesion] and lab[head]]
        y = {k: v[:, idx, :, j] for k, v in preds.items()}  # (n, prompts, R)
        k0 = min(y)
        within_prompt = y[k0].permute(1, 0, 2).reshape(len(idx), -1).var(1).mean().clamp_min(1e-9)
        shares = "  ".join(f"k={k} {1 - v.var(2).mean() / within_prompt:.2f}" for k, v in sorted(y.items()))
        print(f"{lesion} prompts asking for {head}: rate {y[k0].mean():.3f}, share of its within-prompt "
              f"variance fixed by x_k: {shares}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--n", type=int, default=4, help="trajectories per prompt")
    ap.add_argument("--repeats", type=int, default=4, help="continuations from each kept state")
    ap.add_argument("--branch", type=int, nargs="+", default=[0, 2, 4, 6, 8], help="kept states x_k (0 first)")
    ap.add_argument("--head", help="also per lesion, on the prompts asking for this artifact")
    args = ap.parse_args()
    torch.set_num_threads(1)
    branch = args.branch
    heads, preds, rewards = judge_continuations(args.workspace, args.n, args.repeats, branch)
    if args.head:
        print_asked_shares(heads, preds, args.head)
    h = len(heads)
    total = preds[0].reshape(-1, h).var(0).clamp_min(1e-9)
    print("share of each head's variance fixed by x_k (prompt and x_T included at k=0)")
    for k in branch:
        fixed = 1 - preds[k].var(2).reshape(-1, h).mean(0) / total
        print(f"  k={k}: " + "  ".join(f"{name} {v:.2f}" for name, v in zip(heads, fixed.tolist())))
    r0 = rewards[0]  # (n, P, R): R continuations of the same x_T
    within_xt = r0.var(2).mean()
    within_prompt = r0.permute(1, 0, 2).reshape(r0.shape[1], -1).var(1).mean()
    print(f"reward variance within a prompt {within_prompt:.4f}, with x_T fixed too {within_xt:.4f}: "
          f"x_T fixes {1 - within_xt / within_prompt:.2f} of it")


if __name__ == "__main__":
    main()
