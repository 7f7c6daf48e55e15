import json

import pytest

from nca_jax import bench
from nca_jax.config import ModelConfig
from nca_jax.errors import ConfigError


def test_flop_count_matches_the_issue():
    mc = ModelConfig()
    assert bench.flop_per_cell_step(mc) == 25_600
    assert abs(bench.train_flop(mc, 1) - 31.46e9) < 0.01e9
    assert abs(bench.predict_cell_steps(mc, 256) * 25_600 - 89.1e9) < 0.1e9


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    out = tmp_path / "b.json"
    assert (
        bench.main(
            [
                *("--size", "32", "--steps", "2", "--batch", "2", "--reps", "1"),
                *("--compare-perceive", "--compare-fold", "--compare-chunk", "--compare-fired"),
                *("--json", str(out)),
            ]
        )
        == 0
    )
    d = json.loads(out.read_text())
    for k in (
        "matmul_gflops",
        "train_step_s",
        "train_gflops",
        "predict_s",
        "variance10_vmap_s",
        "variance10_loop_s",
        "variance10_s",
        "train_step_im2col_s",
        "speedup_im2col",
        "predict_im2col_s",
        "speedup_predict_im2col",
        "train_step_unfolded_s",
        "speedup_fold",
        "predict_unfolded_s",
        "speedup_predict_fold",
        "train_step_unchunked_s",
        "speedup_chunk",
        "predict_unchunked_s",
        "speedup_predict_chunk",
        "train_step_every_cell_s",
        "speedup_fired",
        "predict_every_cell_s",
        "speedup_predict_fired",
    ):
        assert d[k] > 0, k
    # each ratio comes from the pair timed interleaved, not from the separate base timing
    assert d["speedup_im2col"] == d["train_step_im2col_base_s"] / d["train_step_im2col_s"]
    assert d["speedup_fold"] == d["train_step_unfolded_s"] / d["train_step_unfolded_base_s"]
    assert d["speedup_predict_fold"] == d["predict_unfolded_s"] / d["predict_unfolded_base_s"]
    mc = ModelConfig(steps=2, patch=8)
    assert abs(d["train_gflops"] - bench.train_flop(mc, 2) / d["train_step_s"] / 1e9) < 1e-6
    # the variance's rate is the library's path (what a user runs), the vmap's its own
    flop10 = 10 * bench.predict_cell_steps(mc, 32) * bench.flop_per_cell_step(mc)
    assert d["variance10_gflops"] == pytest.approx(flop10 / d["variance10_s"] / 1e9)
    assert d["variance10_vmap_gflops"] == pytest.approx(flop10 / d["variance10_vmap_s"] / 1e9)
    assert d["variance10_fraction_of_matmul"] == d["variance10_gflops"] / d["matmul_gflops"]
    # the shares are of the higher of the two matmul readings (before and after the timings)
    assert d["matmul_gflops"] == max(d["matmul_gflops_start"], d["matmul_gflops_end"]) > 0
    b2 = d["per_batch"]["2"]
    assert b2["train_fraction_of_matmul"] == b2["train_gflops"] / d["matmul_gflops"]
    assert d["train_fraction_of_matmul"] == d["train_gflops"] / d["matmul_gflops"]


def test_timeit_interleaved_alternates_the_calls():
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in ("a", "b")}
    t = bench.timeit_interleaved(fns, reps=3)
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    assert order == ["a", "b"] * 4  # one warm-up call each, then a, b, a, b, ...


def test_bench_refuses_jax_comparisons_with_tflite_only(tmp_path):
    with pytest.raises(bench.ConfigError, match="not with --tflite-only"):
        bench.main(["--tflite-only", "--tflite", "x.tflite", "--compare-perceive", "--json", "o"])


def test_level1_loss_bench_times_the_deep_step_and_says_so(tmp_path):
    """--level1-loss W times the step with level 1's whole-image loss (a larger loss than the
    plain step's on the same batch and weights) and records W, which time_to_dice keys on."""
    mc = ModelConfig(steps=2, patch=8)
    plain, deep = bench.train_runner(mc, 32, 2), bench.train_runner(mc, 32, 2, 1.0)
    assert float(deep()) > float(plain()) > 0
    out = tmp_path / "b.json"
    args = ["--size", "32", "--steps", "2", "--batch", "2", "--reps", "1", "--skip-predict"]
    assert bench.main([*args, "--level1-loss", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["level1_loss_weight"] == 1.0 and d["per_batch"]["2"]["train_step_s"] > 0


def test_the_jax_twin_of_a_file_trains_with_the_files_loss_at_its_batch_and_size():
    """bench_tflite's JAX twin once timed the plain supervised step whatever the file's config
    said; it now takes the file's loss (level 1's term, a UNet's focal loss) at the file's batch
    and size, and leaves out the weights' average, which the phone's `train` does not keep."""
    from nca_jax.config import RunConfig, TrainConfig

    src = RunConfig(
        model=ModelConfig(patch=8),
        train=TrainConfig(batch_size=16, level1_loss_weight=0.5, ema_decay=0.99),
    ).validate()
    cfg = bench.twin_config(src.to_dict(), 2, 32, "x.tflite")
    t = cfg.train
    assert (t.batch_size, t.image_size, t.level1_loss_weight, t.ema_decay) == (2, 32, 0.5, 0.0)
    assert cfg.finetune.batch_size == 2 and cfg.model == src.model
    unet = RunConfig(
        model=ModelConfig(kind="unet", unet_blocks=2, unet_channels=4),
        train=TrainConfig(loss="dice_focal"),
    ).validate()
    assert bench.twin_config(unet.to_dict(), 1, 32, "u.tflite").train.loss == "dice_focal"
    with pytest.raises(ConfigError, match=r"x.tflite \(its config\).*model.kind"):
        bench.twin_config({**src.to_dict(), "model": {"kind": "gan"}}, 2, 32, "x.tflite")


def test_peer_command_times_the_asked_number_of_calls():
    """--peer-reps reaches the authors' script: their median is over that many calls."""
    cmd = bench.peer_command("/src", "/py", batch=4, size=128, steps=20, reps=9)
    assert cmd[:2] == ["/py", "-W"] and cmd[4] == "/src"
    args = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert args == {"--batch": "4", "--size": "128", "--steps": "20", "--reps": "9"}
    assert bench.peer_command("/src", "/py", 1, 32, 2)[-1] == "1"  # the default: one call
