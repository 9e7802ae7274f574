# Shared by every generated rule file: params access, variants, GPU resources.
# Hand-written (not generated); the rules themselves come from workflow/export.py.
import os

from medrl.config import select, validate_params

# params.yaml is validated once when the workflow is parsed: a bad key fails here, naming it.
PARAMS = validate_params(config, source="params.yaml")


def variants(key):
    node = config
    for part in key.split("."):
        node = node[part]
    return list(node)


def P(keys, wildcards):
    """The params sub-dict a rule declares; Snakemake re-runs the rule when it changes."""
    wc = dict(wildcards.items()) if hasattr(wildcards, "items") else {}
    return select(PARAMS, [k.format(**wc) for k in keys]) if keys else {}


wildcard_constraints:
    variant="|".join(variants("rl.cxr.variants")) or "NONE",


# GPU-heavy rules ask SLURM for MEDRL_GPUS_PER_JOB GPUs (default 1); 0 on a CPU-only cluster.
_GPUS = int(os.environ.get("MEDRL_GPUS_PER_JOB", "1"))
GPU_RESOURCES = {"gpu": _GPUS} if _GPUS > 0 else {}
