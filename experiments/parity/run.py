"""mmdd against the official code, on identical inputs: `python experiments/parity/run.py <method> --official <dir>`.

One command per method. It builds the shared inputs (the embedded dataset in the BLIP Flickr30K layout, a random
nfnet_l0, the random 768-d stand-in BERT, a trajectory store made by `mmdd buffer` and the same experts as the
official replay-buffer files), runs the official script on CPU from the outside (official.py: nothing of the
checkout is edited) while recording its draws and states, replays the same draws in `mmdd distill` from the same
initial set (`draws.replay`, `init_from`), and compares: the set after every recorded iteration's end (images,
texts, step sizes, S) and the per-iteration matching losses. Prints a Markdown row and writes <work>/parity.json.

The official checkout is never copied into this repository; its commit is recorded. See README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The shared problem: small enough for a 2-core CPU, every shape of the papers' stack (nfnet_l0 2304-d features,
# 768-d texts, a 768 -> 2304 text head). Sizes of the embedded dataset's splits:
DATA = {"num_train": 200, "num_val": 50, "num_test": 100}
# LoRS's Flickr30K-100 settings (sh/distill_flickr_lors_100.sh; RepBlend's scripts/distill_flickr_repblend.sh has the
# same), but for the iterations: the official flags and mmdd's.
LORS = {"syn_steps": 8, "expert_epochs": 1, "max_start_epoch": 2, "lr_img": 100, "lr_txt": 100, "lr_lr": 0.01,
        "lr_teacher": 0.1, "lr_sim": 10.0, "sim_rank": 10, "alpha": 3.0, "num_queries": 99, "mini_batch_size": 20,
        "loss_type": "WBCE"}


# Per method: the official script, mmdd's model and method, how the script's draws and states are read (run.json),
# its loss key, and the flags / overrides each side needs beyond the shared settings (LORS).
TESLA_LORS_FLAGS = lambda s: [  # noqa: E731 - LoRS's and RepBlend's own flags
    "--eval_it=0", "--disabled_wandb=True", f"--lr_sim={s['lr_sim']}", "--sim_type=lowrank",
    f"--sim_rank={s['sim_rank']}", f"--alpha={s['alpha']}", f"--loss_type={s['loss_type']}"]
TESLA_LORS_MMDD = lambda s: [  # noqa: E731
    f"budget={s['num_queries'] + 1}",  # S takes one pair's storage
    f"method.lr_sim={s['lr_sim']}", "method.sim_momentum=0.5", "method.inner_loss=wbce", "method.meta_gradient=tesla",
    # the official code's WBCE and TESLA pass 2, as the paper configs set them (experiments/paper_settings.md)
    "method.wbce_log_eps=1e-6", "method.tesla_pass2_dropout=redraw",
    # and its float32 rounding of pass 1 (create_graph=True; the maths is the same)
    "method.tesla_pass1_graph=true",
    "method.similarity.kind=lowrank", f"method.similarity.rank={s['sim_rank']}", f"method.similarity.alpha={s['alpha']}"]
# LoRS and RepBlend: one outer SGD with groups [images], [texts], [both step sizes], [S's diag, left, right]
TESLA_LORS_LAYOUT = [["images"], ["texts"], ["lr_image", "lr_text"], ["sim_diag", "sim_left", "sim_right"]]
METHODS = {
    "lors": {"script": "distill_tesla_lors.py", "model": "nfnet_bert", "method": "lors",
             "flags": TESLA_LORS_FLAGS, "mmdd": TESLA_LORS_MMDD, "layout": TESLA_LORS_LAYOUT, "batches": "chunks",
             "loss_key": "Loss/grand",
             # trainable nfnet_l0 (its weights come from the experts' snapshots): a random one on both sides
             "backbone": None},
    "repblend": {"script": "distill_repblend.py", "model": "nfnet_bert_heads", "method": "repblend",
                 "flags": lambda s: [*TESLA_LORS_FLAGS(s), "--alpha_2=1"], "mmdd": TESLA_LORS_MMDD,
                 "layout": TESLA_LORS_LAYOUT, "batches": "chunks", "loss_key": "Loss/grand",
                 # its data paths after parsing (distill_repblend.py:673-680): links of these names in the cwd
                 "links": {"image_root": "path to flickr30k images", "ann_root": "path to flickr30k annotations"},
                 # a frozen nfnet_l0, the same random weights on both sides (the official script loads them as its
                 # 'pretrained' file, mmdd as model.image.checkpoint)
                 "backbone": "nfnet_l0_random.pth"},
    # PTM-ST (distill_ptm-st.py, one phase as its Flickr-100 script): LoRS's TESLA with a full S on the official
    # convexify.py's shortcut trajectories (mmdd: method.convexify on the store, compared by convexify.py), starts in
    # [min, max), the EMA (decay 0.99) of images, texts and S compared; image_root is fixed by the script
    # (./distill_utils/data/Flickr30k, a link in the cwd).
    "ptm_st": {"script": "distill_ptm-st.py", "model": "nfnet_bert", "method": "ptm_st",
               "flags": lambda s: ["--eval_it=100000", "--disabled_wandb=True", "--subset_num=1", "--sim_type=full",
                                   f"--lr_sim={s['lr_sim']}", f"--loss_type={s['loss_type']}", "--ema_decay=0.99",
                                   "--image_trainable", "--min_start_epoch=0"],
               "mmdd": lambda s: [f"budget={s['num_queries'] + 1}", f"method.lr_sim={s['lr_sim']}",
                                  "method.sim_momentum=0.5", "method.inner_loss=wbce", "method.meta_gradient=tesla",
                                  "method.wbce_log_eps=1e-6", "method.tesla_pass2_dropout=redraw",
                                  "method.tesla_pass1_graph=true", "method.similarity.kind=full",
                                  "method.min_start_epoch=0", "method.convexify=null", "method.ema_decay=0.99"],
               "layout": [["images"], ["texts"], ["lr_image", "lr_text"], ["sim_full"]], "batches": "chunks",
               "loss_key": "Loss/grand", "backbone": None, "ema": True,
               "convexified": True,  # its buffer_path: the official convexify.py's output (snapshots 0..max_start)
               "links": {"image_root": "distill_utils/data/Flickr30k"},
               "hub": {"bert-base-uncased": "standin"},  # its src/networks.py:23-25 loads BERT by hub name
               "dirs": ["npz"]},  # it caches caption embeddings in ./npz/ and does not make the folder
    # MTT-VL (princetonvisualai distill.py): full unroll, InfoNCE at logits log(1/0.07) * cos (no exp: T = 0.376),
    # no S; each step's batch is the first mini_batch_size of a new permutation; three SGDs (images, step sizes, texts).
    "mtt_vl": {"script": "distill.py", "model": "nfnet_bert", "method": "mtt_vl",
               # no evaluation (its eval_it_pool always holds iteration 0: num_eval 0 trains no student), no drawing
               "flags": lambda s: ["--eval_it=100000", "--num_eval=0", "--draw="],
               "mmdd": lambda s: [f"budget={s['num_queries']}", "method.meta_gradient=full",
                                  "method.inner_loss=infonce", f"method.temperature={1 / math.log(1 / 0.07)!r}"],
               "layout": [["images"], ["lr_image", "lr_text"], ["texts"]], "batches": "prefix",
               "loss_key": "Grand_Loss", "backbone": None,
               # its networks.py loads bert-base-uncased from the hub at import
               "hub": {"bert-base-uncased": "standin"}},
}


def sh(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> float:
    """Run `cmd`, its output into `log`; returns the wall seconds, raises with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
    if proc.returncode:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n--- {log} ---\n{tail}")
    return time.perf_counter() - t0


def git_commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (not a git checkout)"


def mmdd_common(work: Path, image_size: int, spec: dict) -> list[str]:
    """The overrides every mmdd stage of the parity run shares (what defines its data, model and teachers)."""
    backbone = [f"model.image.checkpoint={work / spec['backbone']}"] if spec["backbone"] else []
    return [
        f"paths.root_dir={work / 'mmdd'}",
        f"data.image_size={image_size}",
        *[f"data.generate.{k}={v}" for k, v in DATA.items()],
        f"model={spec['model']}", "model.image.pretrained=false", *backbone,
        f"model.text.name_or_path={work / 'standin'}",
        "model.text.device=cpu",
        "teacher.num_experts=2", "teacher.epochs=2", "teacher.batch_size=64",
        "logger=none", "hardware=cpu",
    ]


def write_random_backbone(path: Path) -> None:
    """A random nfnet_l0 (seed 0) as a state-dict file both sides load: the frozen backbone of RepBlend."""
    import timm
    import torch

    from mmdd.utils.io import atomic_write

    torch.manual_seed(0)
    net = timm.create_model("nfnet_l0", pretrained=False, num_classes=0, global_pool="avg")
    atomic_write(path, lambda p: torch.save(net.state_dict(), p))


def prepare(work: Path, image_size: int, spec: dict) -> dict:
    """The stand-in BERT, the data, the teachers (mmdd buffer) and the same experts as replay-buffer files."""
    from mmdd.bench.standin import write_bert_standin
    from mmdd.teachers.replay_buffer import export_replay_buffers
    from mmdd.teachers.trajectory_store import TrajectoryStore

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "standin" / "config.json").exists():
        write_bert_standin(work / "standin")
    if spec["backbone"] and not (work / spec["backbone"]).exists():
        write_random_backbone(work / spec["backbone"])
    store_dir = work / "mmdd" / "store"
    if not (store_dir / "expert_001.safetensors").exists():
        sh([sys.executable, "-m", "mmdd.cli", "buffer", *mmdd_common(work, image_size, spec), f"buffer_dir={store_dir}",
            "hydra.run.dir=" + str(work / "mmdd" / "buffer_run")], work / "buffer.log")
    store = TrajectoryStore.open(store_dir)
    experts = store.completed_experts()
    buffers = work / "buffers"
    if not (buffers / "txt_replay_buffer_0.pt").exists():
        export_replay_buffers(store, buffers, experts, per_file=1)  # file n holds expert experts[n]
    check_parameter_order(store, spec)
    # The official loaders read <ann_root>/flickr30k_{split}.json with image paths relative to image_root: the
    # embedded dataset is written in that (BLIP) format already, under other file names.
    data_root = find_data_root(work)
    ann = work / "flickr_ann"
    ann.mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        shutil.copyfile(data_root / "annotations" / f"synscenes_{split}.json", ann / f"flickr30k_{split}.json")
    return {"store": store_dir, "experts": experts, "buffers": buffers, "image_root": data_root, "ann_root": ann}


def find_data_root(work: Path) -> Path:
    found = sorted((work / "mmdd" / "data").glob("synscenes_*"))
    found = [p for p in found if (p / "annotations" / "synscenes_train.json").exists()]
    if len(found) != 1:
        raise SystemExit(f"expected one generated dataset under {work / 'mmdd' / 'data'}, found {found}")
    return found[0]


def check_parameter_order(store, spec: dict) -> None:
    """The official scripts flatten parameters in `module.parameters()` order (ReparamModule); the buffer files hold
    them in the store's order. Both must be the official modules' order (timm's nfnet_l0, or the image head, and the
    text head: the official ProjectionHead), or the experts would be read into other tensors."""
    import timm

    head = ["projection.weight", "projection.bias", "fc.weight", "fc.bias", "layer_norm.weight", "layer_norm.bias"]
    if spec["backbone"]:  # frozen backbone: the image modality is the image head
        names = [n.removeprefix("image_head.") for n in store.param_names["image"]]
        want = head
    else:
        names = [n.removeprefix("backbone.") for n in store.param_names["image"]]
        want = [n for n, _ in timm.create_model("nfnet_l0", pretrained=False, num_classes=0,
                                                global_pool="avg").named_parameters()]
    if names != want:
        raise SystemExit("the store's image parameters are not in the official module's parameters() order")
    text = [n.removeprefix("text_head.") for n in store.param_names["text"]]
    if text != head:
        raise SystemExit(f"the store's text-head parameters {text} are not the official ProjectionHead's order {head}")


def official_dir(work: Path, float64: bool) -> Path:
    """Where the official run is recorded: float32 and float64 runs side by side."""
    return work / ("official_float64" if float64 else "official")


def convexified(official: Path, work: Path, inputs: dict, start: int, end: int) -> Path:
    """PTM-ST's buffers: the official convexify.py (run unedited) over the exported replay buffers, snapshots
    start..end-1, in <work>/convexify/convexified_<start>_<end>."""
    scratch = work / "convexify"
    out = scratch / f"convexified_{start}_{end}"
    if not (out / "txt_replay_buffer_0.pt").exists():
        normal = scratch / "normal"
        normal.mkdir(parents=True, exist_ok=True)
        for f in Path(inputs["buffers"]).glob("*_replay_buffer_*.pt"):
            shutil.copyfile(f, normal / f.name)
        subprocess.run([sys.executable, str(official / "convexify.py"), "--normal_dir", str(normal), "--start",
                        str(start), "--end", str(end)], check=True, cwd=scratch, stdout=subprocess.DEVNULL)
    return out


def convexified_store(official: Path, work: Path, inputs: dict, start: int, end: int) -> Path:
    """The official convexify.py's trajectories as an mmdd store (the run's store manifest, the experts imported
    from the convexified replay buffers): mmdd's PTM-ST run then matches the very same shortcut snapshots as the
    official one (mmdd's own shortcut, method.convexify, is compared with the official one by convexify.py)."""
    from mmdd.teachers.replay_buffer import import_replay_buffers
    from mmdd.teachers.trajectory_store import TrajectoryStore

    root = work / "mmdd" / f"store_convexified_{start}_{end}"
    if not (root / "expert_001.safetensors").exists():
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(inputs["store"]) / "manifest.json", root / "manifest.json")
        import_replay_buffers(convexified(official, work, inputs, start, end), TrajectoryStore.open(root))
    return root


def run_official(official: Path, work: Path, inputs: dict, iterations: int, image_size: int, float64: bool,
                 spec: dict, phases: int = 1) -> float:
    out = official_dir(work, float64)
    out.mkdir(parents=True, exist_ok=True)
    s = LORS
    # What official.py needs to read the recorded draws and states (the script's own flags below say the same).
    run = {k: s[k] for k in ("syn_steps", "mini_batch_size", "sim_rank", "alpha")}
    (out / "run.json").write_text(json.dumps({**run, "float64": float64, "layout": spec["layout"],
                                              "batches": spec["batches"], "ema": bool(spec.get("ema"))}))
    buffers = inputs["buffers"]
    if spec.get("convexified"):  # PTM-ST: its snapshots 0..max_start_epoch (the window's last target) convexified
        buffers = convexified(official, work, inputs, 0, s["max_start_epoch"] + 1)
    args = script_args(inputs, spec, buffers, iterations, image_size, "parity")
    if phases > 1:  # PTM-ST's subsets (its list-valued flags; argparse keeps the last occurrence)
        windows = phase_windows(phases)
        args += ["--subset_num", str(phases), "--num_queries", *[str(s["num_queries"])] * phases,
                 "--Iteration", *[str(iterations - 1)] * phases, "--buffer_path", *[str(buffers)] * phases,
                 "--min_start_epoch", *[str(lo) for lo, _ in windows], "--max_start_epoch", *[str(hi) for _, hi in windows]]
    cmd = official_command(official, work, out, inputs, spec, ["--float64"] if float64 else [], args)
    return sh(cmd, work / "official.log", env={"WANDB_MODE": "disabled"})


def script_args(inputs: dict, spec: dict, buffers, iterations: int, image_size: int, name: str) -> list[str]:
    """The official script's own flags: the shared settings (LORS), `iterations` iterations, the method's flags."""
    s = LORS
    return [
        "--dataset=flickr", f"--image_root={inputs['image_root']}/", f"--ann_root={inputs['ann_root']}",
        f"--buffer_path={buffers}",
        "--image_encoder=nfnet", "--text_encoder=bert",
        # argparse type=bool: only the empty string is False (a random nfnet_l0); RepBlend: True, from the file
        "--image_pretrained=True" if spec["backbone"] else "--image_pretrained=",
        f"--image_size={image_size}", f"--Iteration={iterations - 1}",
        f"--syn_steps={s['syn_steps']}", f"--expert_epochs={s['expert_epochs']}",
        f"--max_start_epoch={s['max_start_epoch']}", f"--lr_img={s['lr_img']}", f"--lr_txt={s['lr_txt']}",
        f"--lr_lr={s['lr_lr']}", f"--lr_teacher_img={s['lr_teacher']}", f"--lr_teacher_txt={s['lr_teacher']}",
        f"--num_queries={s['num_queries']}", f"--mini_batch_size={s['mini_batch_size']}", f"--name={name}",
        *spec["flags"](s),
    ]


def official_command(official: Path, work: Path, out: Path, inputs: dict, spec: dict, options: list[str],
                     args: list[str]) -> list[str]:
    """official.py running `spec`'s script with `args`, its inputs linked as the script expects them, and
    official.py's own `options` (--float64, --timing, ...)."""
    return [sys.executable, str(Path(__file__).with_name("official.py")), "--official", str(official),
            "--script", spec["script"], "--out", str(out), "--standin", str(work / "standin"),
            *(["--backbone", str(work / spec["backbone"])] if spec["backbone"] else []),
            *[f"--link={name}={inputs[key]}" for key, name in spec.get("links", {}).items()],
            *[f"--hub={name}={work / folder}" for name, folder in spec.get("hub", {}).items()],
            *[f"--mkdir={name}" for name in spec.get("dirs", [])],
            *options, "--", *args]


def phase_windows(phases: int) -> list[tuple[int, int]]:
    """PTM-ST's start windows per subset here: [0, max_start_epoch), then [1, max_start_epoch) (the scripts' second
    subset starts one epoch later: [1, 3) after [0, 2); the parity teachers have only max_start_epoch + 1 snapshots)."""
    return [(min(i, LORS["max_start_epoch"] - 1), LORS["max_start_epoch"]) for i in range(phases)]


def run_mmdd(work: Path, inputs: dict, iterations: int, image_size: int, name: str, overrides: list[str],
             float64: bool, spec: dict, phases: int = 1) -> float:
    s = LORS
    recorded = official_dir(work, float64)
    store = inputs["store"]
    if spec.get("convexified"):  # PTM-ST: the official shortcut snapshots, imported (see convexified_store)
        store = convexified_store(inputs["official"], work, inputs, 0, s["max_start_epoch"] + 1)
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", *mmdd_common(work, image_size, spec), f"method={spec['method']}",
           f"buffer_dir={store}", f"init_from={recorded / 'initial'}",
           f"draws.replay={recorded / 'draws'}", f"hardware.precision={'64-true' if float64 else '32-true'}",
           f"method.iterations={iterations}",
           f"method.syn_steps={s['syn_steps']}", f"method.expert_epochs={s['expert_epochs']}",
           f"method.max_start_epoch={s['max_start_epoch']}", f"method.lr_img={s['lr_img']}",
           f"method.lr_txt={s['lr_txt']}", f"method.lr_lr={s['lr_lr']}", f"method.batch_syn={s['mini_batch_size']}",
           "method.momentum=0.5", "method.lr_min=null", "method.loss_merge=separate", *method_overrides(spec, s, phases),
           "evaluate=false", "diagnostics_every=0", "save_every=0",
           "resume=false", f"hydra.run.dir={work / 'mmdd' / name}", *overrides]
    return sh(cmd, work / f"{name}.log")


def method_overrides(spec: dict, s: dict, phases: int) -> list[str]:
    """The method's own mmdd overrides; with PTM-ST phases, method.phases (each phase its pairs and window; budget
    for all of them, plus S's pair) and each phase started from its official subset's initial set (init_from reads
    a phased set phase by phase; draws.replay likewise)."""
    overrides = spec["mmdd"](s)
    if phases == 1:
        return overrides
    listed = ", ".join(f"{{pairs: {s['num_queries']}, min_start_epoch: {lo}, max_start_epoch: {hi}}}"
                       for lo, hi in phase_windows(phases))
    return [*[o for o in overrides if not o.startswith("budget=")], f"budget={phases * s['num_queries'] + 1}",
            f"method.phases=[{listed}]"]


def on_lors_run(doc: str, checkout: str, add_arguments=None):
    """The command line of the checks that work on the LoRS parity run's inputs (data_pipeline.py, evaluate.py,
    convexify.py): --official, --work, --image-size and `add_arguments(parser)`'s own. Returns (args, the official
    checkout, the run's folder, its inputs: prepare's, built when missing)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help=f"a {checkout} checkout")
    parser.add_argument("--work", type=Path, default=None, help="the LoRS parity run's folder (default "
                        "outputs/parity/lors_<image size>px, written by `run.py lors`)")
    parser.add_argument("--image-size", type=int, default=32, help="the parity run's image size (its files' size)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    work = (args.work or REPO / "outputs" / "parity" / f"lors_{args.image_size}px").resolve()
    return args, args.official.resolve(), work, prepare(work, args.image_size, METHODS["lors"])


def relative(a, b) -> float:
    """max |a - b| / max |b|: the largest difference against the official tensor's scale."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


def compare(work: Path, iterations: int, name: str, float64: bool, loss_key: str, raw: bool = False) -> dict:
    """The mmdd set against the official state after `iterations` (PTM-ST: the EMA, which is what both save; `raw`:
    the optimised set itself, for an mmdd run with method.ema_decay=null). Phased (PTM-ST subsets): every phase
    (mmdd's phase_<i>/ beside the set) against the official state at the end of its subset."""
    from safetensors.torch import load_file

    recorded = official_dir(work, float64)
    states = load_file(str(recorded / "states.safetensors"))
    ema = load_file(str(recorded / "ema.safetensors")) if (recorded / "ema.safetensors").exists() and not raw else {}
    starts = json.loads((recorded / "subsets.json").read_text())["starts"] if (recorded / "subsets.json").exists() \
        else [0, iterations]
    phases = len(starts) - 1
    synthetic = work / "mmdd" / name / "synthetic"
    per_phase = []
    for i in range(phases):
        last = starts[i + 1] - 1  # the subset's last iteration
        official = {k.split(".", 1)[1]: v for k, v in states.items() if k.startswith(f"{last}.")}
        # PTM-ST: the saved set is the EMA (step sizes raw)
        official.update({k.split(".", 1)[1]: v for k, v in ema.items() if k.startswith(f"{last}.")})
        phase = "" if i == phases - 1 else f"phase_{i}"
        per_phase.append(compare_tensors(synthetic / phase, recorded / "initial" / phase, official, float64))
    off_losses = json.loads((recorded / "losses.json").read_text())
    history = json.loads((synthetic / "history.json").read_text())  # every phase's, in order
    losses = []
    for o, h in zip(off_losses, history):
        a, b = h["distill/matching_loss"], o[loss_key]
        losses.append({"iteration": o["iteration"], "official": b, "mmdd": a, "relative": abs(a - b) / abs(b)})
    tensors = per_phase[-1]
    result = {"tensors": tensors, "losses": losses,
              "largest": max([t["relative"] for p in per_phase for t in p.values()] + [l["relative"] for l in losses])}
    if phases > 1:
        result["phases"] = per_phase
    return result


def compare_tensors(mmdd_set: Path, initial: Path, official: dict, float64: bool) -> dict:
    """Each tensor of an mmdd set against the official one: relative and absolute difference, and how far the
    official tensor moved from the initial set (a difference is small only against that)."""
    import torch

    from mmdd.synthetic.synthetic_set import SyntheticSet

    dtype = torch.float64 if float64 else torch.float32
    syn, _ = SyntheticSet.load(mmdd_set, dtype=dtype)
    mine = {"images": syn.images, "texts": syn.texts, "lr_image": syn.lrs["image"].reshape(1),
            "lr_text": syn.lrs["text"].reshape(1)}
    if syn.similarity is not None:
        mine.update({f"sim_{n}": p for n, p in syn.similarity.named_parameters()})
    start, _ = SyntheticSet.load(initial, dtype=dtype)
    tensors = {}
    for key, b in official.items():
        a = mine[key].detach().to(b.dtype)
        moved = {"images": start.images.detach(), "texts": start.texts.detach()}.get(key)
        tensors[key] = {"relative": relative(a, b), "max_abs": float((a - b).abs().max()),
                        "moved": None if moved is None else float((b - moved).abs().max())}
    return tensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--official", required=True, type=Path, help="a checkout of the method's official repository")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default outputs/parity/<method>)")
    parser.add_argument("--iterations", type=int, default=5, help="outer iterations K (default 5)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"change a shared setting on both sides (keys: {', '.join(LORS)}), e.g. lr_img=10")
    parser.add_argument("--reuse-official", action="store_true", help="keep the official run recorded in --work")
    parser.add_argument("--float64", action="store_true",
                        help="both sides in double precision (tells a different computation from different rounding)")
    parser.add_argument("--phases", type=int, default=1, help="PTM-ST: distil this many subsets in turn (its "
                        "200/500-pair scripts: 2), each phase compared")
    parser.add_argument("--name", default=None, help="name of this mmdd run (several variants side by side)")
    parser.add_argument("overrides", nargs="*", help="further mmdd overrides, e.g. +method.wbce_log_eps=1e-6")
    args = parser.parse_intermixed_args()
    official = args.official.resolve()
    spec = METHODS[args.method]
    script = official / spec["script"]
    if not script.is_file():
        raise SystemExit(f"{script} not found: --official must be a checkout of the method's repository (README.md)")
    changed = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in LORS:
            raise SystemExit(f"--set {item}: unknown setting {key!r}; one of {', '.join(LORS)}")
        changed[key] = type(LORS[key])(value)
    LORS.update(changed)  # read by run_official and run_mmdd
    if args.phases > 1 and args.method != "ptm_st":
        raise SystemExit("--phases: only PTM-ST distils in phases")
    suffix = "".join(f"_{k}{v}" for k, v in changed.items()) + (f"_{args.phases}phases" if args.phases > 1 else "")
    work = (args.work or REPO / "outputs" / "parity" / f"{args.method}_{args.image_size}px{suffix}").resolve()
    inputs = prepare(work, args.image_size, spec)
    inputs["official"] = official
    if inputs["experts"] != list(range(len(inputs["experts"]))):
        raise SystemExit(f"store experts {inputs['experts']}: expected 0..n-1 (replay-buffer file n = expert n)")
    name = args.name or ("mmdd_float64" if args.float64 else "mmdd")
    if args.reuse_official and (official_dir(work, args.float64) / "states.safetensors").exists():
        seconds_official = None
    else:
        seconds_official = run_official(official, work, inputs, args.iterations, args.image_size, args.float64, spec,
                                        args.phases)
    seconds_mmdd = run_mmdd(work, inputs, args.iterations, args.image_size, name, args.overrides, args.float64, spec,
                            args.phases)
    result = compare(work, args.iterations, name, args.float64, spec["loss_key"],
                     raw="method.ema_decay=null" in args.overrides)
    result.update({"settings": dict(LORS), "method": args.method, "official_commit": git_commit(official), "iterations": args.iterations,
                   "image_size": args.image_size, "float64": args.float64, "seconds": {"official": seconds_official, "mmdd": seconds_mmdd},
                   "command": " ".join(["python", "experiments/parity/run.py", *sys.argv[1:]])})
    result["overrides"] = args.overrides
    (work / f"parity_{name}.json").write_text(json.dumps(result, indent=2))
    precision = "float64" if args.float64 else "float32"
    print(f"| {args.method} | distillation ({args.iterations} it, {args.image_size} px, {precision}) | {result['largest']:.2e} | "
          f"{result['official_commit'][:7]} |")
    for i, tensors in enumerate(result.get("phases", [result["tensors"]])):
        for name, t in tensors.items():
            where = f"phase {i}: " if "phases" in result else ""
            print(f"  {where}{name}: relative {t['relative']:.2e} (max abs {t['max_abs']:.2e}, moved {t['moved']})")
    for l in result["losses"]:
        print(f"  loss it {l['iteration']}: official {l['official']:.6f} mmdd {l['mmdd']:.6f} rel {l['relative']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
