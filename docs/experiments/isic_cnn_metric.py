"""A second H=4 metric model, a plain 8-conv CNN (not EfficientNet-B0) trained on the cls_b
split like clf_h4, and APR under it: real test images, SD and RL samples, RL - SD per head.
Checks whether APR's verdict depends on EfficientNet-B0's blind spots (gel bubble, ink).

    python docs/experiments/isic_cnn_metric.py <workspace>
"""
import torch, pandas as pd, numpy as np, sys
from torch import nn
from sklearn.metrics import roc_auc_score
torch.set_num_threads(1); torch.manual_seed(0)
from medrl.io import load_image
from medrl.models.classifiers import augment_batch
from medrl.metrics.apr import read_manifest
from medrl.data.prompts import prompt_to_labels
W = sys.argv[1].rstrip('/') + '/'
it = pd.read_csv(W + 'data/prepared/isic/items.csv')
H = ['hair','gel_bubble','ruler','ink']
def load(sp):
    r = it[it.split == sp]
    return torch.stack([load_image(W + p) for p in r.path]), torch.tensor(r[H].values, dtype=torch.float32)
Xtr, Ytr = load('cls_b'); Xte, Yte = load('test')
def block(i, o): return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
net = nn.Sequential(block(3, 32), block(32, 64), block(64, 96), block(96, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 4))
opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
mean = torch.tensor([0.485, 0.456, 0.406]).view(1,3,1,1); std = torch.tensor([0.229, 0.224, 0.225]).view(1,3,1,1)
g = torch.Generator().manual_seed(0)
E = 20
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, E * ((len(Xtr) + 31) // 32))
for ep in range(E):
    net.train(); perm = torch.randperm(len(Xtr), generator=g)
    for i in range(0, len(perm), 32):
        idx = perm[i:i+32]; x = augment_batch(Xtr[idx], g)
        loss = nn.functional.binary_cross_entropy_with_logits(net((x-mean)/std), Ytr[idx])
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
net.eval()
def probs(x):
    with torch.no_grad(): return torch.sigmoid(net((x-mean)/std)).numpy()
p = probs(Xte)
print('test AUROC', {h: round(roc_auc_score(Yte[:, j], p[:, j]), 3) for j, h in enumerate(H)})
exact = ((p > 0.5) == (Yte.numpy() > 0.5)).all(1)
print('real test APR', exact.mean().round(3), 'per-head acc', ((p > 0.5) == (Yte.numpy() > 0.5)).mean(0).round(3))
res = {}
for m in ('sd', 'rl'):
    man = read_manifest(W + f'data/samples/isic/{"sd" if m == "sd" else "rl/seed_0"}/manifest.csv')
    x = torch.stack([load_image(q) for q in man.path])
    t = np.array([[prompt_to_labels(q)[h] for h in H] for q in man.prompt])
    match = (probs(x) > 0.5) == (t > 0.5)
    res[m] = match
    print(m, 'APR', match.all(1).mean().round(3), 'per-head match', match.mean(0).round(3))
d = res['rl'].all(1).astype(float) - res['sd'].all(1).astype(float)
rng = np.random.default_rng(0); bs = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(1000)]
print('APR RL-SD', round(d.mean(), 3), np.quantile(bs, [.025, .975]).round(3))
for j, h in enumerate(H):
    dh = res['rl'][:, j].astype(float) - res['sd'][:, j]
    bs = [dh[rng.integers(0, len(dh), len(dh))].mean() for _ in range(1000)]
    print(' ', h, round(dh.mean(), 3), np.quantile(bs, [.025, .975]).round(3))
