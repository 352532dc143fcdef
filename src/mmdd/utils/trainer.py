"""Lightning Trainer from the `hardware` config: the only place that knows about devices."""

from __future__ import annotations

import contextlib
import logging

import torch

from mmdd.utils.cpu_heap import configure_cpu_heap

log = logging.getLogger(__name__)


def accelerate_model(model, hw, second_order: bool = False):
    """Apply `hardware.channels_last` and `hardware.compile` to a dual encoder (both default off).

    torch.compile has no double backward, so the backbone is compiled only where autograd goes through it
    once: teachers, students, pre-training, and distillation when the backbone is frozen. Distilling through
    a trainable backbone (`second_order=True`) differentiates its gradient, and keeps it uncompiled.
    """
    compile = bool(hw.get("compile", False))
    if compile and second_order and not model.backbone_frozen:
        log.warning("hardware.compile is not applied to the backbone here: distilling through a trainable "
                    "backbone needs double backward, which torch.compile does not support")
        compile = False
    return model.accelerate(channels_last=bool(hw.get("channels_last", False)), compile=compile)


def precision_dtype(hw) -> torch.dtype:
    """The dtype of the learned tensors under `hardware.precision`: float64 for 64-true (Lightning's double
    precision, for numerical checks), else float32 (mixed precisions autocast around float32 tensors)."""
    return torch.float64 if str(hw.precision).startswith("64") else torch.float32


def num_processes(accelerator, devices, num_nodes=1) -> int:
    """How many processes Lightning will run for these settings (strategy `auto` becomes DDP when > 1)."""
    from omegaconf import ListConfig

    if isinstance(devices, (list, tuple, ListConfig)):
        n = len(devices)
    elif str(devices) in ("auto", "-1"):
        gpu = str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        n = torch.cuda.device_count() if gpu else 1
    elif "," in str(devices):
        n = len([d for d in str(devices).split(",") if d.strip()])
    else:
        n = int(devices)
    return max(n, 1) * int(num_nodes)


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes, evaluates and prints."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@contextlib.contextmanager
def alone_in_its_trainers():
    """Inside: this process runs one-process trainers of its own (process r's students after an N-process
    distillation), so it logs as their rank 0; Lightning's loggers (W&B, CSV) stay silent on a rank > 0."""
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning_utilities.core import rank_zero as utilities_rank_zero

    flags = {id(f): f for f in (fabric_rank_zero.rank_zero_only, utilities_rank_zero.rank_zero_only)}.values()
    before = [getattr(f, "rank", 0) for f in flags]
    for flag in flags:
        flag.rank = 0
    try:
        yield
    finally:
        for flag, rank in zip(flags, before):
            flag.rank = rank


def device_label(hw) -> str:
    """What a stage ran on, for its cost record: e.g. '1x NVIDIA H200' or 'cpu (2 threads)'."""
    n = hardware_processes(hw)
    if str(hw.accelerator) in ("gpu", "cuda") and torch.cuda.is_available():
        return f"{n}x {torch.cuda.get_device_name(0)}"
    return f"{n}x cpu ({torch.get_num_threads()} threads)" if n > 1 else f"cpu ({torch.get_num_threads()} threads)"


def process_device(hw) -> torch.device:
    """Where this process runs work outside a Lightning trainer (caption embeddings, a k-means initialisation, a
    selection's teacher embeddings): its own GPU when the hardware uses GPUs (its local rank's entry of
    hardware.devices, as Lightning assigns them; the local rank from whichever launcher started it, SLURM's
    SLURM_LOCALID included), else the CPU."""
    if str(hw.accelerator) not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return torch.device("cpu")
    from mmdd.utils.launch import local_rank

    rank = local_rank()
    devices = hw.devices
    if isinstance(devices, str) and "," in devices:
        devices = [int(d) for d in devices.split(",") if d.strip()]
    ids = list(devices) if not isinstance(devices, (int, str)) else None
    return torch.device("cuda", int(ids[rank]) if ids else rank)


def one_device(hw):
    """A one-process trainer's `devices` on this process's own device: [its GPU's index] (Lightning's `devices=1` is
    GPU 0, whichever rank asks), else 1."""
    device = process_device(hw)
    return [device.index] if device.type == "cuda" else 1


def setup_process(hw) -> None:
    """At a stage's start, before any work: the launch matches the hardware config (a cluster launcher started one
    process per device: mmdd.utils.launch.check), a multi-process run that would fall back to CPU processes says so
    (refused under a cluster launcher), and CUDA's current device is this rank's, so that "cuda" (caption embedding,
    cached features) never lands on another rank's GPU."""
    from mmdd.utils.launch import check

    processes = hardware_processes(hw)
    nodes = int(hw.get("num_nodes", 1))
    launch = check(processes // nodes, nodes)
    check_accelerator(str(hw.accelerator))
    if processes > 1 and str(hw.accelerator) == "auto" and not torch.cuda.is_available():
        what = (f"hardware.accelerator=auto with {processes} processes, but no CUDA GPU is visible here "
                "(torch.cuda.is_available() is False)")
        if launch.external:
            from mmdd.errors import MmddError

            raise MmddError(f"{what}: {launch.launcher} started this run on a node without usable GPUs. Check the "
                            "job's GPU request (hydra.launcher.gpus_per_node) and CUDA_VISIBLE_DEVICES, or set "
                            "hardware.accelerator=cpu if CPU processes (gloo) are what you want")
        log.warning("%s: running %d CPU processes with gloo, far slower than GPUs. Set hardware.accelerator=cpu to "
                    "say this is meant, or hardware.accelerator=gpu to insist on GPUs", what, processes)
    apply_tf32(bool(hw.get("tf32", False)))
    device = process_device(hw)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.launcher != "none":
        log.info("%s, device %s", launch.describe(), device)


def apply_tf32(on: bool) -> None:
    """`hardware.tf32`: TF32 tensor cores for fp32 matmuls and cuDNN convolutions, both at once (torch's own
    defaults differ: convolutions on, matmuls off), so a run is either full fp32 or TF32 throughout."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def hardware_record(hw) -> dict:
    """How a stage's numbers were computed, for manifests and results.json: the device, the processes, the
    precision, TF32 as it was in effect, deterministic algorithms, and the library versions."""
    gpu = str(hw.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return {
        "device": device_label(hw),
        "processes": hardware_processes(hw),
        "precision": str(hw.precision),
        "tf32": {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}
        if gpu else None,
        "deterministic": bool(hw.get("deterministic", False)),
        "cpu_heap": str(hw.get("cpu_heap", "os")),  # speed and memory only
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpu else None,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
    }


def hardware_processes(hw) -> int:
    return num_processes(hw.accelerator, hw.devices, hw.get("num_nodes", 1))


def build_trainer(cfg, loggers=None, callbacks=None, **overrides):
    """The stage's Lightning Trainer: `cfg.trainer` (conf/trainer/, from `hardware`) with the stage's loggers,
    callbacks and `overrides`; every trainer stops on a signal at the same step on every rank (SignalStop), and
    several processes run mmdd's DDP."""
    from hydra.utils import instantiate

    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    configure_cpu_heap(cfg.hardware.cpu_heap)
    trainer = instantiate(cfg.trainer, _convert_="all")  # a partial: the stage adds what it owns
    kwargs = {**trainer.keywords, "logger": loggers if loggers else False, "callbacks": callbacks or [], **overrides}
    if not any(getattr(c, "handles_signals", False) for c in kwargs["callbacks"]):
        from mmdd.utils.signal_stop import SignalStop

        kwargs["callbacks"] = [*kwargs["callbacks"], SignalStop()]  # every rank stops at the same step on a signal
    check_accelerator(kwargs["accelerator"])
    processes = num_processes(kwargs["accelerator"], kwargs["devices"], kwargs["num_nodes"])
    from mmdd.utils.launch import current, lightning_environment

    # Lightning is told the launch mmdd found (it would take SLURM's ranks for torchrun's workers, and refuse a
    # one-process trainer, rank 0's students, inside an N-task SLURM or torchrun job)
    environment = lightning_environment() if processes > 1 else None
    if environment is None and current().launcher != "none":
        from lightning.pytorch.plugins.environments import LightningEnvironment

        environment = LightningEnvironment()
    if environment is not None:
        kwargs["plugins"] = [*(kwargs.get("plugins") or []), environment]
    if processes > 1:
        refuse_ddp_in_local_multirun()
        from mmdd.utils.ddp import start_processes

        # mmdd starts (and watches) the other processes; Lightning's DDP joins them
        start_processes(processes // kwargs["num_nodes"], kwargs["num_nodes"])
        if kwargs["strategy"] == "auto":
            kwargs["strategy"] = "ddp"  # what Lightning picks for several processes, said here
    return trainer.func(**kwargs)


def check_accelerator(accelerator: str) -> None:
    """A GPU asked for on a machine without one: a sentence saying what to set, not Lightning's traceback."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        from mmdd.errors import MmddError

        raise MmddError(f"hardware.accelerator={accelerator}, but this machine has no usable CUDA GPU "
                        "(torch.cuda.is_available() is False): use hardware=cpu, or hardware.accelerator=auto "
                        "(a GPU where there is one, else the CPU; hardware=ddp on CPUs runs its processes with gloo)")


def refuse_ddp_in_local_multirun() -> None:
    """Lightning starts DDP ranks > 0 by re-running the command line; inside a Hydra multirun that command is the
    whole sweep. SLURM jobs (submitit, one task per device) start their ranks themselves and are fine."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    from mmdd.utils.launch import current

    if current().launcher != "none":
        return
    from mmdd.errors import MmddError

    raise MmddError("several processes (hardware.devices x num_nodes > 1) inside a local multirun (-m): Lightning "
                    "would start the whole sweep again "
                    "in every extra process. Run each multi-GPU job as a single run, or launch the sweep with "
                    "hydra/launcher=slurm hydra.launcher.tasks_per_node=<devices per node>")
