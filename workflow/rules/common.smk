# Shared by every generated rule file: params access, wildcard values, GPU resources.
# Hand-written (not generated); the rules themselves come from workflow/export.py.
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(workflow.basedir, "workflow"))

from medrl.config import validate_params
from graph import values_of
from state import record_in_dvc_hook, write_all_params_files

# params.yaml is validated once when the workflow is parsed: a bad key fails here, naming it.
PARAMS = validate_params(config, source="params.yaml")
# each stage's declared params, as the input file that reruns it when they change
write_all_params_files(Path.cwd(), PARAMS)


def values(key):
    """A wildcard's values from params.yaml: a mapping's keys, a list's items or one value."""
    return values_of(PARAMS, key)


def declared_keys(keys, wildcards):
    """The params.yaml keys a rule declares (their values are in its medrl_params input)."""
    wc = dict(wildcards.items()) if hasattr(wildcards, "items") else {}
    return [k.format(**wc) for k in keys]


wildcard_constraints:
    variant="|".join(values("rl.cxr.variants")) or "NONE",
    seed=r"\d+",


# GPU-heavy rules (gpu=True in graph.py) ask SLURM for MEDRL_GPUS_PER_JOB GPUs (default 1;
# 0 on a CPU-only cluster). snakemake-executor-plugin-slurm turns `gpu` into `--gpus=N`, or
# `--gpus=MODEL:N` with `gpu_model` (MEDRL_GPU_MODEL); `gpu` and a gpu `gres` are mutually
# exclusive there, so only `gpu` is used. MEDRL_SLURM_GPU_PARTITION sends these rules to a
# GPU partition (rule resources override the profile's default-resources). Local runs
# (no executor plugin) ignore all of these.
def _gpu_resources(env):
    gpus = int(env.get("MEDRL_GPUS_PER_JOB", "1"))
    if gpus <= 0:
        return {}
    res = {"gpu": gpus}
    if env.get("MEDRL_GPU_MODEL"):
        res["gpu_model"] = env["MEDRL_GPU_MODEL"]
    if env.get("MEDRL_SLURM_GPU_PARTITION"):
        res["slurm_partition"] = env["MEDRL_SLURM_GPU_PARTITION"]
    return res


GPU_RESOURCES = _gpu_resources(os.environ)
