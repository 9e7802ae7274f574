"""medrl bench: the GPU check's CPU form, the baseline ratio, the cost table's epoch timer."""
from __future__ import annotations

import json

import pytest
import torch

from medrl.bench import BASELINE, compare_baseline, epoch_time, main

torch.set_num_threads(1)


def test_gpu_check_tiny_form_on_cpu(tmp_path):
    """--gpu-check at SD-v1.5's architecture, 1/10 width: bf16 rows with counted UNet FLOPs,
    the log-prob drift against fp32, MFU against a given peak, and one DDPO epoch."""
    out = tmp_path / "gpu.json"
    assert main(["--device", "cpu", "--gpu-check", "--sd15-tiny", "--steps", "2", "--batch", "2", "--train-batch", "2",
                 "--sd15-batch", "2", "--sd15-train-batch", "2", "--train-micro-steps", "1", "--tiny-size", "16",
                 "--epoch-trajectories", "4", "--epoch-steps", "2", "--epoch-sample-batch", "2", "--epoch-train-batch", "2",
                 "--peak-tflops", "1.0", "--params", str(tmp_path / "absent.yaml"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    sd = next(r for r in res["results"] if r["model"].startswith("sd15-tiny"))
    assert sd["mixed_precision"] == "bf16" and sd["latent"] == [4, 8, 8] and sd["image"] == [3, 64, 64]
    # a CFG forward of B=2 is >= 2 x 2 x (multiply-adds of the convs): clearly non-zero, and the
    # micro-step (forward + backward of 2 samples) costs more than the forward of 2
    assert 0 < sd["unet_gflop_per_sample_step"] < sd["unet_gflop_per_train_micro_step"]
    assert sd["sample_mfu"] > 0 and sd["train_mfu"] > 0 and sd["logprob_drift"] >= 0
    ep = res["ddpo_epoch"]
    assert ep["trajectories"] == 4 and ep["num_steps"] == 2 and ep["epoch_s"] >= ep["sample_s"] > 0


def test_baseline_ratio_only_for_the_same_workload():
    base = json.loads(BASELINE.read_text())
    row = {**base["config"], "trajectories_per_s": 2 * base["median"]["trajectories_per_s"],
           "sample_timesteps_per_s": base["median"]["sample_timesteps_per_s"]}
    assert compare_baseline(row, base) == pytest.approx({"vs_baseline_sampling": 2.0, "vs_baseline_training": 1.0})
    assert compare_baseline({**row, "batch": row["batch"] + 1}, base) == {}
    # the baseline stepped the optimizer after every micro-step: accumulation is another workload
    assert compare_baseline({**row, "accumulate": 1}, base) != {}
    assert compare_baseline({**row, "accumulate": 4}, base) == {}
    # the baseline's UNet had 8 heads; fewer heads keep the parameter count but not the cost
    assert compare_baseline({**row, "attention_heads": 8}, base) != {}
    assert compare_baseline({**row, "attention_heads": 2}, base) == {}


def test_fused_training_phase_runs(tmp_path):
    """--accumulate/--fuse time the trainer's fused accumulation groups (3 micro-steps: chunks of 2 and 1)."""
    out = tmp_path / "fuse.json"
    assert main(["--device", "cpu", "--steps", "2", "--batch", "2", "--train-batch", "2", "--train-micro-steps", "3",
                 "--tiny-size", "16", "--accumulate", "3", "--fuse", "2", "--merge-lora", "--params", str(tmp_path / "absent.yaml"),
                 "--baseline", "", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["accumulate"] == 3 and row["fuse"] == 2 and row["merge_lora"] and row["sample_timesteps_per_s"] > 0


def test_attention_heads_override_sets_the_unet_and_the_workload(tmp_path):
    out = tmp_path / "heads.json"
    assert main(["--device", "cpu", "--steps", "2", "--batch", "2", "--train-batch", "2", "--train-micro-steps", "1",
                 "--tiny-size", "16", "--attention-heads", "2", "--params", str(tmp_path / "absent.yaml"),
                 "--baseline", "", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["attention_heads"] == 2  # the schema default is 8


def test_epoch_time_runs_the_trainer(tmp_path):
    times = epoch_time(4, 2, 16, epochs=2, params_path=tmp_path / "absent.yaml")
    assert len(times) == 2 and all(t > 0 for t in times)
