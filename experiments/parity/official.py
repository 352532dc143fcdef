"""Run an official distillation script on CPU, unchanged, and record what it drew and what it computed.

    python experiments/parity/official.py --official <checkout> --script distill_tesla_lors.py --out <dir> \
        --standin <bert folder> -- <the script's own arguments>

Runs in its own process (run.py starts it), with the working directory `<out>/cwd` (the script's relative paths:
./distill_utils/checkpoints/bert-base-uncased, the caption-embedding .npz caches, ./logged_files). Nothing of the
checkout is edited; what this file changes is at import time and listed in PATCHES (each: what and why). None of
them changes what an iteration computes.

Recorded into <out>:
- initial/      the synthetic set the script starts from (images, texts, step sizes, S), as an mmdd synthetic set
- draws/        every iteration's draws in mmdd's format (mmdd.utils.draws): the expert (the replay-buffer file the
                script loaded), the start epoch, the inner mini-batches, the dropout masks
- states.safetensors   the set after every outer step ("<iteration>.<tensor>")
- losses.json   the script's logged losses per iteration (Loss/grand, Loss/img_grand, Loss/txt_grand)
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import types
from pathlib import Path

# What is changed in the official process, and why (README.md repeats it).
PATCHES = {
    "device": "torch.Tensor.to / nn.Module.to map 'cuda' to 'cpu' (the scripts hard-code .to('cuda'))",
    "wandb": "a recorder replaces wandb (init/log/finish/Image/Histogram/Html): logged values are kept, nothing is sent",
    "tokenizer": "transformers 5 removed batch_encode_plus; it calls the tokenizer itself, which is what it did",
    "bert": "./distill_utils/checkpoints/bert-base-uncased is a link to the random 2-layer 768-d stand-in BERT; "
            "MTT-VL loads 'bert-base-uncased' from the hub (networks.py:13-14): --hub maps that name to the stand-in",
    "stubs": "modules the run imports but never calls, when not installed (clip, kornia, pandas, scipy.ndimage."
             "interpolation; sklearn's cosine_similarity is used by --draw only): stand-ins that raise if called",
    "recorders": "numpy.random.randint, torch.randperm, torch.distributions.Beta.sample (RepBlend's blend lambda), "
                 "torch.nn.functional.dropout, torch.load and torch.optim.SGD are wrapped: each calls the original and "
                 "records its result (who called, what came back)",
    "data paths": "RepBlend's script replaces --image_root/--ann_root by the placeholders 'path to flickr30k images' / "
                  "'path to flickr30k annotations' after parsing (distill_repblend.py:673-680): relative paths, so "
                  "links of those names in the run's working directory lead to the data (--link)",
    "backbone weights": "RepBlend's frozen nfnet_l0 'pretrained' file (./distill_utils/checkpoints/"
                        "nfnet_l0_ra2-45c6688d.pth, its src/networks.py:694-695) is a link to the random nfnet_l0 "
                        "that mmdd's run loads as model.image.checkpoint",
}
# Only with --float64 (both sides in double precision, to tell a different computation from different rounding):
PATCHES_FLOAT64 = {
    "default dtype": "torch.set_default_dtype(torch.float64): new parameters, torch.tensor/randn and ToTensor are float64",
    "loaded tensors": "floating tensors from torch.load (the replay buffers) and torch.from_numpy (the caption-embedding "
                      "caches) are cast to float64",
    "float()": "Tensor.float() casts to the default dtype (float64) instead of float32 (distill_tesla_lors.py 370, 406 "
               "cast the logits' operands)",
    "bert": "the stand-in BERT is loaded in float64",
}


def _cpu(arg):
    import torch

    if isinstance(arg, str) and arg.startswith("cuda"):
        return "cpu"
    if isinstance(arg, torch.device) and arg.type == "cuda":
        return torch.device("cpu")
    return arg


def patch_devices() -> None:
    import torch

    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to

    def t_to(self, *args, **kwargs):
        return tensor_to(self, *[_cpu(a) for a in args], **{k: _cpu(v) for k, v in kwargs.items()})

    def m_to(self, *args, **kwargs):
        return module_to(self, *[_cpu(a) for a in args], **{k: _cpu(v) for k, v in kwargs.items()})

    torch.Tensor.to = t_to
    torch.nn.Module.to = m_to


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        message = (f"parity harness: {self.__name__}.{name} is a stand-in (module not installed) and the official "
                   "script called it; install the module")

        def refuse(*args, **kwargs):
            raise RuntimeError(message)
        if name[:1].isupper():  # a class: other libraries may test isinstance(x, pandas.DataFrame) against it
            return type(name, (), {"__init__": refuse})
        return refuse


def stub_missing(names) -> None:
    import importlib
    import importlib.machinery

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                stub = _Stub(".".join(parts[:i]))
                # a spec, as a real module has (torch's dynamo looks modules up with importlib.util.find_spec)
                stub.__spec__ = importlib.machinery.ModuleSpec(stub.__name__, None)
                sys.modules.setdefault(stub.__name__, stub)


def patch_tokenizer() -> None:
    from transformers import PreTrainedTokenizerBase

    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        PreTrainedTokenizerBase.batch_encode_plus = lambda self, texts, **kwargs: self(texts, **kwargs)


def patch_hub(names: dict[str, str]) -> None:
    """from_pretrained(name) of a model or tokenizer reads `names[name]` (a local folder) instead of the hub."""
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    for cls in (PreTrainedModel, PreTrainedTokenizerBase):
        original = cls.from_pretrained.__func__

        def local(klass, name, *args, _original=original, **kwargs):
            return _original(klass, names.get(str(name), name), *args, **kwargs)

        cls.from_pretrained = classmethod(local)


class Recorder:
    """Everything the official loop drew and computed, by iteration (an iteration starts at wandb.log({"Progress"}))."""

    def __init__(self, script: Path):
        self.script = str(script)
        self.iteration = -1
        self.iterations: list[dict] = []
        self.loaded: list[str] = []  # torch.load paths in order
        self.initial: dict | None = None
        # PTM-ST with several subsets (its main() runs once per subset, each with new outer optimizers): the earlier
        # subsets' initial sets, and the recorder's iteration index where each subset begins
        self.initials: list[dict] = []
        self.subset_starts: list[int] = [0]
        self.states: dict = {}
        self.optimizers: list = []  # the outer SGDs, in the order the script made them
        self.layout: list[list[str]] = []  # per (optimizer, group): the role of each parameter (run.json)
        self.ema: dict = {}  # PTM-ST: its ModelEmaV2's tensors after each update, by iteration
        self.losses: list[dict] = []

    def from_script(self, depth: int = 2) -> bool:
        return sys._getframe(depth).f_code.co_filename == self.script

    def now(self) -> dict:
        return self.iterations[self.iteration]

    def start_iteration(self, it: int) -> None:
        self.iteration = len(self.iterations)
        self.iterations.append({"it": it, "randint": [], "randperm": [], "blend_perms": [], "lams": [], "masks": [],
                                "loads_before": len(self.loaded)})

    def install(self) -> None:
        import numpy as np
        import torch
        import torch.nn.functional as F

        rec = self
        randint, randperm, dropout, load = np.random.randint, torch.randperm, F.dropout, torch.load
        beta_sample = torch.distributions.Beta.sample

        def rec_randint(*args, **kwargs):
            value = randint(*args, **kwargs)
            if rec.iteration >= 0 and rec.from_script():
                rec.now()["randint"].append(int(value))
            return value

        def rec_randperm(*args, **kwargs):
            value = randperm(*args, **kwargs)
            if rec.iteration >= 0 and rec.from_script():
                # RepBlend draws the blend's permutation in mix_embedding_up, the mini-batches' in the loop
                blend = sys._getframe(1).f_code.co_name == "mix_embedding_up"
                rec.now()["blend_perms" if blend else "randperm"].append(value.tolist())
            return value

        def rec_beta_sample(self, *args, **kwargs):
            value = beta_sample(self, *args, **kwargs)
            if rec.iteration >= 0 and rec.from_script():
                rec.now()["lams"].append(float(value))
            return value

        def rec_dropout(input, p=0.5, training=True, inplace=False):
            if rec.iteration >= 0:  # the input's sum: where a forward first differs from mmdd's (debugging)
                rec.now().setdefault("dropout_inputs", []).append([float(p), float(input.detach().double().sum())])
            out = dropout(input, p, training, inplace)
            if training and p > 0 and rec.iteration >= 0:
                rec.now()["masks"].append((out != 0).to(torch.uint8).cpu())
            return out

        def rec_load(f, *args, **kwargs):
            rec.loaded.append(str(f))
            return load(f, *args, **kwargs)

        class RecordingSGD(torch.optim.SGD):
            def __init__(self, params, *args, **kwargs):
                super().__init__(params, *args, **kwargs)
                if rec.initial is not None:  # after a step: a new subset (PTM-ST), with outer optimizers of its own
                    rec.initials.append(rec.initial)
                    rec.initial, rec.optimizers = None, []
                    rec.subset_starts.append(len(rec.iterations))
                rec.optimizers.append(self)

            def step(self, closure=None):
                if rec.initial is None:  # before the first outer step: every outer optimizer exists by now
                    rec.initial = rec.snapshot()
                out = super().step(closure)
                rec.states[rec.iteration] = rec.snapshot()  # the iteration's last step leaves its final state
                return out

        np.random.randint = rec_randint
        torch.randperm = rec_randperm
        torch.distributions.Beta.sample = rec_beta_sample
        F.dropout = rec_dropout
        torch.load = rec_load
        torch.optim.SGD = RecordingSGD

    def record_ema(self) -> None:
        """PTM-ST: wrap its model_ema.ModelEmaV2.update (the checkout's module) to keep the EMA after each update,
        by the same roles as the optimizer's (its list: images, texts, S's parameters, then the two step sizes)."""
        import model_ema

        rec, update = self, model_ema.ModelEmaV2.update

        def recording_update(ema, params):
            update(ema, params)
            roles = [r for group in rec.layout for r in group if not r.startswith("lr_")]
            rec.ema[rec.iteration] = {role: t.detach().clone().cpu() for role, t in zip(roles, ema.module)}

        model_ema.ModelEmaV2.update = recording_update

    def snapshot(self) -> dict:
        """The outer optimizers' parameters by role (`layout`: one list of roles per optimizer group, in order)."""
        groups = [g["params"] for opt in self.optimizers for g in opt.param_groups]
        if len(groups) != len(self.layout):
            raise RuntimeError(f"the script made {len(groups)} outer parameter groups, run.json's layout names "
                               f"{len(self.layout)}: {self.layout}")
        out = {}
        for roles, params in zip(self.layout, groups):
            for role, p in zip(roles, params):
                t = p.detach().clone().cpu()
                out[role] = t.reshape(1) if role.startswith("lr_") else t
        return out

    def wandb(self) -> types.ModuleType:
        rec = self
        mod = types.ModuleType("wandb")

        class Run:
            name = "parity"

        def log(values, step=None, **kwargs):
            if "Progress" in values:
                rec.start_iteration(int(values["Progress"]))
            losses = {k: float(v) for k, v in values.items()
                      if k.startswith("Loss/") or k == "Grand_Loss"}  # LoRS/RepBlend; MTT-VL
            if losses:
                rec.losses.append({"iteration": rec.iteration, **losses})

        mod.init = lambda *a, **k: Run()
        mod.log = log
        mod.finish = lambda *a, **k: None
        mod.run = Run()
        for name in ("Image", "Histogram", "Html", "Table"):
            setattr(mod, name, lambda *a, **k: None)
        return mod


class Timer:
    """`--timing`: only when each iteration begins (wandb.log({"Progress"}), the script's first call of an iteration)
    and when the loop ends (wandb.finish); nothing else is wrapped or recorded, so the loop runs at its own speed."""

    def __init__(self, count_flops: bool = False):
        self.starts: list[tuple[int, float]] = []
        self.finished: float | None = None
        # --flops-last: each iteration's operations counted (mmdd.bench.flops.OpCosts: FLOPs by PyTorch's FLOP counter
        # formulas, and bytes moved; entered at its start, left at the next one's), the last one's record kept; an
        # untimed run
        self.count_flops, self.counter, self.costs = count_flops, None, None
        self.cuda_peak_mb: float | None = None  # --device cuda: the script's peak allocated GPU memory

    def _count(self, start_next: bool) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.costs = self.counter.record()
            self.counter = None
        if start_next:
            from mmdd.bench.flops import OpCosts

            self.counter = OpCosts()
            self.counter.__enter__()

    def wandb(self) -> types.ModuleType:
        import time

        import torch

        timer, mod = self, types.ModuleType("wandb")

        class Run:
            name = "timing"

        def log(values, step=None, **kwargs):
            if "Progress" in values:
                if torch.cuda.is_available():  # the previous iteration's kernels finished
                    torch.cuda.synchronize()
                timer.starts.append((int(values["Progress"]), time.perf_counter()))
                if timer.count_flops:
                    timer._count(start_next=True)

        def finish(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                timer.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
            timer.finished = time.perf_counter()
            if timer.count_flops:
                timer._count(start_next=False)

        mod.init, mod.log, mod.finish, mod.run = (lambda *a, **k: Run()), log, finish, Run()
        for name in ("Image", "Histogram", "Html", "Table"):
            setattr(mod, name, lambda *a, **k: None)
        return mod

    def seconds(self) -> list[float]:
        """Each iteration's wall seconds: from its start to the next one's (the last: to wandb.finish)."""
        ends = [t for _, t in self.starts[1:]] + ([self.finished] if self.finished is not None else [])
        return [end - start for (_, start), end in zip(self.starts, ends)]


def _to_default_dtype(value):
    """Floating tensors inside (nested lists/tuples/dicts of) `value` cast to the default dtype."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(torch.get_default_dtype()) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_default_dtype(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_default_dtype(v) for k, v in value.items()}
    return value


def patch_float64() -> None:
    """PATCHES_FLOAT64: run the official script in double precision. Installed after the recorders (torch.load)."""
    import torch
    import transformers

    torch.set_default_dtype(torch.float64)
    load, from_numpy = torch.load, torch.from_numpy
    torch.load = lambda *a, **k: _to_default_dtype(load(*a, **k))
    torch.from_numpy = lambda array: _to_default_dtype(from_numpy(array))
    torch.Tensor.float = lambda self, memory_format=torch.preserve_format: self.to(
        torch.get_default_dtype(), memory_format=memory_format)
    from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__

    @classmethod
    def double_from_pretrained(cls, *args, **kwargs):
        return from_pretrained(cls, *args, **kwargs).double()

    transformers.PreTrainedModel.from_pretrained = double_from_pretrained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path)
    parser.add_argument("--script", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--standin", required=True, type=Path)
    parser.add_argument("--backbone", type=Path, default=None,
                        help="the nfnet_l0 weights RepBlend's script loads as 'pretrained' (a .pth state dict)")
    parser.add_argument("--float64", action="store_true", help="run in double precision (PATCHES_FLOAT64)")
    parser.add_argument("--timing", action="store_true", help="time the iterations only (no recorders): "
                        "<out>/timing.json holds each iteration's wall seconds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (default): the scripts' "
                        "'cuda' is mapped to the CPU (PATCHES device); cuda: they run on the GPU as written")
    parser.add_argument("--cpu-heap", choices=("os", "keep"), default="os", help="with --timing: the process's "
                        "allocator as mmdd's hardware.cpu_heap sets it (keep: freed memory reused, mmdd.utils.cpu_heap); "
                        "os (default): the C library's, as the script runs anywhere")
    parser.add_argument("--flops-last", action="store_true", help="with --timing: count the last iteration's FLOPs "
                        "and bytes moved (mmdd.bench.flops.OpCosts; slows the run, whose times are then not the "
                        "loop's)")
    parser.add_argument("--link", action="append", default=[], metavar="NAME=TARGET",
                        help="a link NAME in the run's working directory to TARGET (paths a script hard-codes)")
    parser.add_argument("--hub", action="append", default=[], metavar="NAME=FOLDER",
                        help="from_pretrained(NAME) reads FOLDER (a script that loads a hub model by name)")
    parser.add_argument("--mkdir", action="append", default=[], metavar="NAME",
                        help="a folder the script writes into but does not make (in the run's working directory)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    official, out = args.official.resolve(), args.out.resolve()
    script = official / args.script
    cwd = out / "cwd"
    link = cwd / "distill_utils" / "checkpoints" / "bert-base-uncased"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(args.standin.resolve(), target_is_directory=True)
    for name in args.mkdir:
        (cwd / name).mkdir(parents=True, exist_ok=True)
    for spec in args.link:
        name, target = spec.split("=", 1)
        path = cwd / name
        if path.is_symlink() or path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(Path(target).resolve(), target_is_directory=True)
    if args.backbone is not None:
        weights = link.parent / "nfnet_l0_ra2-45c6688d.pth"
        if weights.is_symlink() or weights.exists():
            weights.unlink()
        weights.symlink_to(args.backbone.resolve())
    os.chdir(cwd)

    import torch

    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", torch.get_num_threads())))
    if args.device == "cpu":
        patch_devices()
    stub_missing(["clip", "kornia", "sklearn.metrics.pairwise", "pandas", "scipy.ndimage.interpolation"])
    patch_tokenizer()
    if args.hub:
        patch_hub(dict(item.split("=", 1) for item in args.hub))
    sys.argv = [str(script), *[a for a in args.script_args if a != "--"]]
    if args.timing:
        from mmdd.utils.cpu_heap import configure_cpu_heap

        configure_cpu_heap(args.cpu_heap)
        timer = Timer(args.flops_last)
        sys.modules["wandb"] = timer.wandb()
        sys.path.insert(0, str(official))
        runpy.run_path(str(script), run_name="__main__")
        from mmdd.utils.io import atomic_write_json

        atomic_write_json(out / "timing.json", {"seconds": timer.seconds(), "iterations": [i for i, _ in timer.starts],
                                                "threads": torch.get_num_threads(),
                                                "flops": timer.costs["flops"] if timer.costs else None,
                                                "op_costs": timer.costs,
                                                "cuda_peak_mb": timer.cuda_peak_mb})
        return 0
    rec = Recorder(script)
    rec.layout = json.loads((out / "run.json").read_text())["layout"]
    sys.modules["wandb"] = rec.wandb()
    rec.install()
    if args.float64:
        patch_float64()
    sys.path.insert(0, str(official))
    if json.loads((out / "run.json").read_text()).get("ema"):
        rec.record_ema()
    runpy.run_path(str(script), run_name="__main__")
    save(rec, out)
    return 0


def batches_of(perms: list[list[int]], steps: int, size: int) -> list[list[int]]:
    """The scripts' inner mini-batches: consecutive chunks of a permutation, a new permutation when the next chunk
    would run past its end (distill_tesla_lors.py 339-348; the same rule as mmdd's BatchSchedule). The permutations
    are the recorded ones, in the order the script drew them."""
    out, perms = [], list(perms)
    perm, pos = perms.pop(0), 0
    for _ in range(steps):
        if pos + size > len(perm):
            perm, pos = perms.pop(0), 0
        out.append(perm[pos:pos + size])
        pos += size
    if perms:
        raise RuntimeError(f"{len(perms)} recorded permutations left unused: the script drew differently than expected")
    return out


def initial_set(init: dict, run: dict):
    """A subset's initial outer parameters (by role) as an mmdd synthetic set."""
    from mmdd.synthetic.similarity import FullSimilarity, LowRankSimilarity
    from mmdd.synthetic.synthetic_set import SyntheticSet

    similarity = None
    if "sim_full" in init:
        similarity = FullSimilarity(len(init["images"]))
        similarity.load_state_dict({"full": init["sim_full"]})
    if "sim_left" in init:
        similarity = LowRankSimilarity(len(init["images"]), run["sim_rank"], run["alpha"])
        similarity.load_state_dict({"diag": init["sim_diag"], "left": init["sim_left"], "right": init["sim_right"]})
    return SyntheticSet(init["images"], init["texts"], {"image": init["lr_image"][0], "text": init["lr_text"][0]},
                        similarity, dtype=init["images"].dtype)


def draws_of(rec: Recorder, run: dict, first: int, end: int) -> tuple[list[dict], dict]:
    """The draws of recorded iterations first..end-1 in mmdd's format (mmdd.utils.draws), numbered from 0."""
    iterations, masks = [], {}
    buffers = [(n, path) for n, path in enumerate(rec.loaded) if "img_replay_buffer_" in Path(path).name]
    for k, it in enumerate(rec.iterations[first:end]):
        # the file the iteration's expert came from (one expert per file): the last buffer loaded before it began
        loaded = [path for n, path in buffers if n < it["loads_before"]][-1]
        expert = int(Path(loaded).stem.rsplit("_", 1)[1])
        if len(it["randint"]) != 1:
            raise RuntimeError(f"iteration {first + k}: {len(it['randint'])} start-epoch draws recorded, expected 1")
        for j, m in enumerate(it["masks"]):
            masks[f"{k}.{j}"] = m.contiguous()
        blends = None
        if it["lams"] or it["blend_perms"]:  # RepBlend: one (lambda, permutation) per inner step of pass 1
            if not len(it["lams"]) == len(it["blend_perms"]) == run["syn_steps"]:
                raise RuntimeError(f"iteration {first + k}: {len(it['lams'])} blend lambdas and "
                                   f"{len(it['blend_perms'])} blend permutations recorded, expected {run['syn_steps']}")
            blends = [[lam, perm] for lam, perm in zip(it["lams"], it["blend_perms"])]
        if run["batches"] == "prefix":  # MTT-VL: each step, the first mini_batch_size of a new permutation
            batches = [perm[:run["mini_batch_size"]] for perm in it["randperm"]]
        else:
            batches = batches_of(it["randperm"], run["syn_steps"], run["mini_batch_size"])
        iterations.append({"expert": expert, "start": it["randint"][0], "batches": batches,
                           "blends": blends, "dropout_calls": len(it["masks"])})
    return iterations, masks


def save(rec: Recorder, out: Path) -> None:
    """Writes what `rec` recorded; <out>/run.json (written by run.py) names the settings it needs to read the draws:
    syn_steps, mini_batch_size, sim_rank, alpha."""
    from safetensors.torch import save_file

    from mmdd.utils.draws import write_draws
    from mmdd.utils.io import atomic_write, atomic_write_json

    run = json.loads((out / "run.json").read_text())
    initials = [*rec.initials, rec.initial]
    starts = [*rec.subset_starts, len(rec.iterations)]
    for i, init in enumerate(initials):
        # one subset: initial/ and draws/; several (PTM-ST): the last in initial/, earlier ones in initial/phase_<i>/
        # (a phased set's layout, which mmdd's init_from reads phase by phase), draws in draws/phase_<i>/
        phase = "" if len(initials) == 1 else f"phase_{i}"
        where = out / "initial" if i == len(initials) - 1 else out / "initial" / phase
        initial_set(init, run).save(where, {"source": "official", "script": rec.script, "subset": i})
        iterations, masks = draws_of(rec, run, starts[i], starts[i + 1])
        write_draws(out / "draws" / phase, iterations, masks, source=f"official:{rec.script}")
    atomic_write_json(out / "subsets.json", {"starts": starts})
    states = {f"{k}.{name}": t.contiguous() for k, state in rec.states.items() for name, t in state.items()}
    atomic_write(out / "states.safetensors", lambda p: save_file(states, str(p)))
    if rec.ema:
        ema = {f"{k}.{name}": t.contiguous() for k, state in rec.ema.items() for name, t in state.items()}
        atomic_write(out / "ema.safetensors", lambda p: save_file(ema, str(p)))
    atomic_write_json(out / "losses.json", rec.losses)
    atomic_write_json(out / "dropout_inputs.json", [it.get("dropout_inputs", []) for it in rec.iterations])
    atomic_write_json(out / "patches.json", {**PATCHES, **(PATCHES_FLOAT64 if run.get("float64") else {})})
    print(f"official run recorded: {len(rec.iterations)} iterations in {len(initials)} subset(s) -> {out}")


if __name__ == "__main__":
    sys.exit(main())
