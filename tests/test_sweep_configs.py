"""Optuna sweeps, launchers and hardware configs compose through Hydra's compose API (nothing is launched)."""

import pytest
from hydra import compose, initialize_config_dir

from mmdd.paths import conf_dir

SWEEPS = ["mtt_vl", "tesla_vl", "lors", "repblend"]


def composed(stage, overrides):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(stage, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("method", SWEEPS)
@pytest.mark.parametrize("stage", ["distill", "run"])
def test_optuna_sweep_per_method(stage, method):
    cfg = composed(stage, [f"sweep={method}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.method.name == method
    # the objective is val r_mean: the students select on val, test is never searched on
    assert cfg.protocol.selection == "val" and cfg.evaluate is True
    params = dict(sweeper.params)
    assert "method.lr_img" in params and "method.lr_txt" in params
    for key in params:  # every searched key exists in the composed config
        node = cfg
        for part in key.split("."):
            node = node[part]
    if method in ("lors", "repblend"):
        assert {"method.lr_sim", "method.similarity.rank"} <= set(params)
    if method == "repblend":
        assert "method.blend.alpha" in params
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"


def test_slurm_launcher_takes_partition_and_gpus_from_the_command_line():
    cfg = composed("distill", ["hydra/launcher=slurm", "hydra.launcher.partition=a100", "hydra.launcher.gpus_per_node=4",
                               "hydra.launcher.tasks_per_node=4", "hydra.launcher.timeout_min=60", "hardware=ddp",
                               "hardware.devices=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == ("a100", 4, 4, 60)
    # each job of a multirun writes under its own sweep subdir; submitit's logs under the sweep dir
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"
    assert OmegaConf.to_container(launcher)["submitit_folder"].startswith("${hydra.sweep.dir}")
    assert (cfg.hardware.strategy, cfg.hardware.devices) == ("ddp", 4)


def test_local_parallel_launcher_and_hardware_variants():
    assert composed("run", ["hydra/launcher=local"]).hydra.launcher._target_.endswith("JoblibLauncher")
    assert composed("run", ["hardware=gpu_bf16"]).hardware.precision == "bf16-mixed"
    for hw in ("cpu", "gpu", "gpu_bf16", "ddp"):
        cfg = composed("run", [f"hardware={hw}"]).hardware
        assert {"accelerator", "devices", "num_nodes", "strategy", "precision"} <= set(cfg)
