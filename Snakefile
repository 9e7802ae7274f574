# medrl workflow. The stage graph is defined once in workflow/graph.py; the rules included
# below are generated from it by workflow/export.py (dvc.yaml too).
#   snakemake --cores 2 all              # embedded default, local (one RL seed)
#   snakemake --cores 2 all_seeds        # all + the RL runs of every seed in rl.seeds, tables over seeds
#   snakemake --profile slurm all        # on a SLURM cluster (profile: workflow/profiles/slurm)
configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/targets.smk"


rule all:
    input:
        TARGETS,
    default_target: True


rule all_seeds:
    input:
        TARGETS,
        SEED_TARGETS,


include: "workflow/rules/isic.smk"
include: "workflow/rules/cxr.smk"
include: "workflow/rules/summary.smk"  # both tracks' claims in one table (track "summary")


# dvc.lock records every stage Snakemake finished (and only those), so `dvc status` and
# `dvc repro` agree with this run; a failed run records the stages that completed.
onsuccess:
    record_in_dvc_hook(Path.cwd(), PARAMS)


onerror:
    record_in_dvc_hook(Path.cwd(), PARAMS)
