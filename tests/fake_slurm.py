"""A SLURM stand-in on one machine, for the tests of submitit jobs (hydra/launcher=slurm): `sbatch`, `srun`,
`scontrol` and `sacct` on PATH, doing what the real ones do for submitit's scripts.

- `sbatch <script>` reads the script's `#SBATCH` lines (array, ntasks-per-node, output, error, job-name), prints
  `Submitted batch job <id>` and starts every array task in the background with SLURM's job variables (unless
  FAKE_SLURM_HOLD is set: then the test runs a task itself with `run-task`). A task waits for submitit's pickle
  (written after sbatch returns), then runs the script with bash.
- `srun [options] command` starts SLURM_NTASKS copies of the command with SLURM_PROCID / SLURM_LOCALID /
  SLURM_NODEID, their output in the `--output` / `--error` files (%A %a %j %t expanded), forwards SIGUSR2, SIGTERM and
  SIGINT to them (as SLURM's `--signal` reaches every task) and exits with the worst code.
- `scontrol` records its arguments in $FAKE_SLURM_DIR/scontrol.log (submitit requeues with `scontrol requeue`).
- `sacct` knows nothing (submitit then waits for the result files).

Install with `install(bin_dir, state_dir)`; every record goes under FAKE_SLURM_DIR.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """Write the four commands into `bin_dir`; returns the environment that puts them first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for command in ("sbatch", "srun", "scontrol", "sacct"):
        path = bin_dir / command
        path.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {command} \"$@\"\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state_dir)}


def _state() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def _options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", Path(script).read_text(), flags=re.M))


def _expand(pattern: str, env: dict[str, str], task: str = "0") -> str:
    for key, value in (("%A", env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"])),
                       ("%a", env.get("SLURM_ARRAY_TASK_ID", "0")), ("%j", env["SLURM_JOB_ID"]), ("%t", task)):
        pattern = pattern.replace(key, value)
    return pattern


def _array(spec: str | None) -> list[str]:
    if spec is None:
        return []
    spec = spec.split("%")[0]
    out = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        out += [str(i) for i in range(int(low), int(high or low) + 1)]
    return out


def task_env(script: str, job: str, index: str | None) -> dict[str, str]:
    """SLURM's variables for the batch script of array task `index` of job `job`."""
    opts = _options(script)
    nodes, per_node = int(opts.get("nodes", 1)), int(opts.get("ntasks-per-node", 1))
    env = {"SLURM_JOB_ID": job if index is None else f"{job}{int(index) + 1:03d}",
           "SLURM_JOB_NAME": opts.get("job-name", "fake"), "SLURM_NNODES": str(nodes),
           "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes * per_node),
           "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
           "SLURM_NODEID": "0"}
    if index is not None:
        env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=index)
    return env


def sbatch(args: list[str]) -> int:
    script = args[-1]
    counter = _state() / "next_job"
    job = str(int(counter.read_text()) if counter.exists() else 1000)
    counter.write_text(str(int(job) + 1))
    kept = _state() / f"job_{job}.sh"
    kept.write_text(Path(script).read_text())
    indices = _array(_options(script).get("array")) or [None]
    with open(_state() / "sbatch.jsonl", "a") as f:
        f.write(json.dumps({"job": job, "script": str(kept), "indices": indices}) + "\n")
    if not os.environ.get("FAKE_SLURM_HOLD"):
        for index in indices:
            subprocess.Popen([sys.executable, __file__, "run-task", str(kept), job, str(index)],
                             start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job}")
    return 0


def run_task(args: list[str]) -> int:
    """Run one array task of a submitted script in the foreground: `run-task <script> <job> <index|None>`."""
    script, job, index = args[0], args[1], (None if args[2] == "None" else args[2])
    env = {**os.environ, **task_env(script, job, index)}
    pickle_folder = re.search(r"submitit\.core\._submit (\S+)", Path(script).read_text()).group(1).strip("'\"")
    submitit_id = f"{job}_{index}" if index is not None else job
    pickle = Path(pickle_folder.replace("%j", submitit_id)) / f"{submitit_id}_submitted.pkl"
    deadline = time.monotonic() + 120
    while not pickle.exists() and time.monotonic() < deadline:  # submitit renames it after sbatch returns
        time.sleep(0.1)
    opts = _options(script)
    out, err = (_expand(opts[k], env) for k in ("output", "error"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as o, open(err, "a") as e:
        proc = subprocess.Popen(["bash", script], env=env, stdout=o, stderr=e)
        _forward_signals([proc])
        return proc.wait()


def _forward_signals(procs: list[subprocess.Popen]) -> None:
    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)


def srun(args: list[str]) -> int:
    opts, i = {}, 0
    while i < len(args) and args[i].startswith("-"):
        key, eq, value = args[i].partition("=")
        if eq:
            opts[key] = value
            i += 1
        elif key in ("--output", "--error", "-o", "-e"):
            opts[key] = args[i + 1]
            i += 2
        else:
            i += 1
    command = args[i:]
    ntasks = int(os.environ.get("SLURM_NTASKS", 1))
    with socket.socket() as s:
        s.bind(("", 0))
        port = str(s.getsockname()[1])
    procs, files = [], []
    for t in range(ntasks):
        env = {**os.environ, "SLURM_PROCID": str(t), "SLURM_LOCALID": str(t), "SLURM_NODEID": "0",
               "SLURM_STEP_ID": "0", "MASTER_PORT": os.environ.get("MASTER_PORT", port)}
        out = open(_expand(opts["--output"], env, str(t)), "a") if "--output" in opts else None
        err = open(_expand(opts["--error"], env, str(t)), "a") if "--error" in opts else None
        files += [f for f in (out, err) if f]
        procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=err))
    with open(_state() / "srun.jsonl", "a") as f:
        f.write(json.dumps({"job": os.environ.get("SLURM_JOB_ID"), "srun": os.getpid(),
                            "pids": [p.pid for p in procs]}) + "\n")
    _forward_signals(procs)
    codes = [p.wait() for p in procs]
    for f in files:
        f.close()
    return max(codes, key=abs)


def scontrol(args: list[str]) -> int:
    with open(_state() / "scontrol.log", "a") as f:
        f.write(" ".join(args) + "\n")
    return 0


def sacct(args: list[str]) -> int:
    print("JobID|State|NodeList")
    return 0


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "sacct": sacct, "run-task": run_task}[command](rest)
             % 256)
