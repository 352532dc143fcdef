"""Who started this process and which of a run's processes it is.

Four launchers start mmdd's processes, and each says so in the environment:
- torchrun (`TORCHELASTIC_RUN_ID`, `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`): every rank;
- SLURM (`srun`, and submitit, whose job runs `srun python -m submitit.core._submit`): every rank as one task
  (`SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NODEID`, `SLURM_NTASKS_PER_NODE`, `SLURM_NNODES`); a job
  named `bash` or `interactive` is a shell inside an allocation, not a launcher (Lightning's rule too);
- mmdd itself (mmdd.utils.ddp): ranks 1..N-1 of `hardware.devices=N`, started by local rank 0 with `LOCAL_RANK`,
  `NODE_RANK` and `WORLD_SIZE` set;
- nobody: a single process, which becomes local rank 0 of mmdd's own launch where the run wants several.

torchrun is looked for first: `srun torchrun ...` starts torchrun under SLURM, and its workers are torchrun's ranks
(Lightning would take SLURM's one task per node for them). mmdd hands the environment it found to Lightning
(`lightning_environment`), so the two never disagree about ranks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

SLURM_SHELL_JOB_NAMES = ("bash", "interactive")


@dataclass(frozen=True)
class Launch:
    launcher: str  # "torchrun" | "slurm" | "mmdd" | "none"
    global_rank: int
    local_rank: int
    node_rank: int
    world_size: int
    tasks_per_node: int  # this node's processes
    num_nodes: int

    @property
    def external(self) -> bool:
        """Every rank was started by a cluster launcher: mmdd must start none."""
        return self.launcher in ("torchrun", "slurm")

    def describe(self) -> str:
        return (f"{self.launcher}: process {self.global_rank} of {self.world_size} (local rank {self.local_rank} "
                f"on node {self.node_rank} of {self.num_nodes})")


def _int(value: str | None, default: int) -> int:
    """An integer from a launcher's variable; SLURM writes per-node counts as `4(x2)` or `4,2`: the first one."""
    if value is None:
        return default
    match = re.match(r"\s*(\d+)", value)
    return int(match.group(1)) if match else default


def slurm_job() -> bool:
    """A SLURM task started by srun/sbatch (not a shell in an interactive allocation)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in SLURM_SHELL_JOB_NAMES


def current() -> Launch:
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        world, per_node = _int(env.get("WORLD_SIZE"), 1), _int(env.get("LOCAL_WORLD_SIZE"), 1)
        return Launch("torchrun", _int(env.get("RANK"), 0), _int(env.get("LOCAL_RANK"), 0),
                      _int(env.get("GROUP_RANK"), 0), world, per_node, max(1, world // max(per_node, 1)))
    if slurm_job():
        world = _int(env.get("SLURM_NTASKS"), 1)
        nodes = _int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES")), 1)
        per_node = _int(env.get("SLURM_NTASKS_PER_NODE"), max(1, world // nodes))
        return Launch("slurm", _int(env.get("SLURM_PROCID"), 0), _int(env.get("SLURM_LOCALID"), 0),
                      _int(env.get("SLURM_NODEID"), 0), world, per_node, nodes)
    if "LOCAL_RANK" in env:
        world = _int(env.get("WORLD_SIZE", env.get("MMDD_WORLD_SIZE")), 1)  # Lightning's teardown drops WORLD_SIZE
        node = _int(env.get("NODE_RANK"), 0)
        per_node = _int(env.get("MMDD_PROCESSES_PER_NODE"), world)
        local = _int(env.get("LOCAL_RANK"), 0)
        return Launch("mmdd", node * per_node + local, local, node, world, per_node, max(1, world // per_node))
    return Launch("none", 0, 0, 0, 1, 1, 1)


def local_rank() -> int:
    return current().local_rank


def check(processes_per_node: int, num_nodes: int) -> Launch:
    """The launch, checked against the hardware config: a cluster launcher must have started exactly the processes
    the config runs (one per device), or every process would run the whole job, or Lightning would hang waiting for
    ranks that never come. Raises MmddError with the settings to change."""
    from mmdd.errors import MmddError

    launch = current()
    if not launch.external:
        return launch
    want = processes_per_node * num_nodes
    if (launch.tasks_per_node, launch.num_nodes) == (processes_per_node, num_nodes) and launch.world_size == want:
        return launch
    if launch.launcher == "slurm":
        fix = (f"start {processes_per_node} task(s) per node on {num_nodes} node(s) (hydra.launcher.tasks_per_node="
               f"{processes_per_node} hydra.launcher.nodes={num_nodes} with hydra/launcher=slurm, or srun "
               f"--ntasks-per-node={processes_per_node} --nodes={num_nodes}), or set hardware.devices="
               f"{launch.tasks_per_node} hardware.num_nodes={launch.num_nodes}")
    else:
        fix = (f"start torchrun with --nproc-per-node={processes_per_node} --nnodes={num_nodes}, or set "
               f"hardware.devices={launch.tasks_per_node} hardware.num_nodes={launch.num_nodes}")
    raise MmddError(f"{launch.launcher} started {launch.tasks_per_node} process(es) per node on {launch.num_nodes} "
                    f"node(s) ({launch.world_size} in all), but hardware.devices={processes_per_node} x "
                    f"hardware.num_nodes={num_nodes} runs {want}, one per device: {fix}")


def lightning_environment(launch: Launch | None = None):
    """The Lightning cluster environment for `launch` (None: Lightning's default, which reads LOCAL_RANK).
    SLURM's without Lightning's own requeue on SIGUSR1: a requeued mmdd run resumes from mmdd's checkpoint, which
    mmdd saves itself on the scheduler's signal (mmdd.utils.stopping)."""
    launch = launch or current()
    if launch.launcher == "torchrun":
        from lightning.pytorch.plugins.environments import TorchElasticEnvironment

        return TorchElasticEnvironment()
    if launch.launcher == "slurm":
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        return SLURMEnvironment(auto_requeue=False)
    return None
