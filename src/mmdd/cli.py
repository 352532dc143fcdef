"""`mmdd <stage> [hydra overrides]`: one Hydra app per stage."""

from __future__ import annotations

import logging
import os
import sys

from mmdd.stage_list import STAGES  # light modules: no torch before the signal handlers
from mmdd.utils.stopping import LAUNCHER_PID_ENV, STAGE_ENV

# Commands that read finished artifacts: plain argparse, no Hydra composition (`mmdd <command> --help`).
COMMANDS = {
    "table": "collect results.json files (and W&B runs) into a paper-style table",
    "export": "write a synthetic set as a plain image-caption dataset",
    "plan": "parameter counts, store size and estimated peak memory of a stage's config (runs nothing)",
}

log = logging.getLogger("mmdd")
_started: list[str] = []  # the stage whose task Hydra called (a failure before it is Hydra's composition)


def _task(stage: str):
    def task(cfg) -> float | None:
        """Runs the stage; returns the val objective (val r_mean) where the stage evaluates, for sweepers."""
        from hydra.errors import InstantiationException

        from mmdd.errors import MmddError, Stopped

        _started.append(stage)
        quiet_third_party()
        from mmdd.utils.stopping import adopt_submitit_job

        adopt_submitit_job(stage)  # a submitit job calls this task without main(): stage name and signal handlers
        try:
            from mmdd.utils.preflight import preflight
            from mmdd.utils.trainer import setup_process

            preflight(cfg, stage)
            setup_process(cfg.hardware)  # the launch checked; "cuda" is this rank's GPU from here on
            objective = STAGES[stage].run(cfg)
            from mmdd.utils.ddp import leave_process_group, wait_for_started

            wait_for_started()
            leave_process_group()
            return objective
        except (KeyboardInterrupt, SystemExit):
            from mmdd.utils.stopping import explain, requeue

            code = explain(stage)
            if code is None:
                raise
            requeue(stage)
            sys.exit(code)
        except RuntimeError as exc:  # a collective of a multi-process run failing because a process is gone
            from mmdd.utils.ddp import lost_process
            from mmdd.utils.stopping import STOP_EXPLAINED

            who = lost_process(exc)
            if who is None:
                raise
            STOP_EXPLAINED.set()  # the watch of rank 0 then ends the others without a second sentence
            print(f"mmdd {stage}: error: {who}", file=sys.stderr)
            sys.exit(2)
        except (MmddError, InstantiationException) as exc:
            # hydra.utils.instantiate wraps a method's own config errors (its settings dataclass's checks)
            error = exc.__cause__ if isinstance(exc, InstantiationException) else exc
            if not isinstance(error, MmddError):
                raise
            if isinstance(error, Stopped):
                from mmdd.utils.stopping import requeue, say

                say(stage, str(error))
                requeue(stage)
                sys.exit(error.exit_code)
            print(f"mmdd {stage}: error: {error}", file=sys.stderr)
            if in_optuna_search():
                from mmdd.errors import TrialFailed

                raise TrialFailed(str(error)) from None
            sys.exit(2)

    return task


def in_optuna_search() -> bool:
    """Whether this run is a trial of Hydra's Optuna sweeper (a failed trial is then the search's to record)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    sweeper = HydraConfig.get().sweeper
    return "optuna" in str(sweeper.get("_target_", "")).lower()


def quiet_third_party() -> None:
    """Lightning prints a banner (GPU available, tips) for every trainer; keep its warnings only."""
    import warnings

    import lightning  # noqa: F401 - sets its loggers' levels on import; override after

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # Students train on in-memory tensors (TensorDataset): worker processes would only copy them.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def usage() -> str:
    lines = ["usage: mmdd <stage> [key=value ...] [-m for a multirun]", "", "stages:"]
    lines += [f"  {s.name:<9} {s.help}" for s in STAGES.values()]
    lines += ["", "commands:"] + [f"  {k:<9} {v}" for k, v in COMMANDS.items()]
    lines += ["", "Show a stage's composed config: mmdd <stage> --cfg job"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    relaunched = os.environ.get(STAGE_ENV)
    if relaunched in STAGES and "LOCAL_RANK" in os.environ and (not argv or argv[0] not in STAGES):
        argv = [relaunched, *argv]  # a rank > 0 started by mmdd.utils.ddp (see below)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage = argv[0]
    if stage in COMMANDS:
        from mmdd import commands

        sys.exit(getattr(commands, stage)(argv[1:]))
    if stage not in STAGES:
        print(f"mmdd: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    import hydra

    from mmdd.paths import conf_dir

    # W&B's per-run console banners drown the stage's output; runs are still written (see README).
    os.environ.setdefault("WANDB_SILENT", "true")
    # Hydra reads the overrides from sys.argv[1:]; mmdd.utils.ddp starts ranks > 0 as `python -m mmdd.cli
    # <sys.argv[1:]>` with LOCAL_RANK set, and the stage is handed over in the environment.
    os.environ[STAGE_ENV] = stage
    if "LOCAL_RANK" not in os.environ:  # ranks > 0 keep their launcher's: a changed parent means rank 0 died
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    sys.argv = [os.path.abspath(__file__)] + argv[1:]
    from mmdd.utils.stopping import explain, install

    install()
    from mmdd.utils.ddp import watch_launcher

    watch_launcher()  # a rank > 0 started by mmdd ends when local rank 0 is gone, even inside an NCCL collective
    app = hydra.main(config_path=str(conf_dir()), config_name=stage, version_base="1.3")(_task(stage))
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as exc:  # stopped while Hydra composes or sets up, or on the way out
        if isinstance(exc, SystemExit) and exc.code == 1 and not _started:  # Hydra refused the command line
            from mmdd.utils.overrides import unknown_keys

            for sentence in unknown_keys(stage, argv[1:]):
                print(f"mmdd {stage}: error: {sentence}", file=sys.stderr)
        code = explain(stage)
        if code is None:
            raise
        sys.exit(code)


if __name__ == "__main__":
    main()
