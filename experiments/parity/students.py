"""The students' training against the official evaluation: `python experiments/parity/students.py --official <LoRS_Distill>`.

One fixed synthetic set (by default the set of the LoRS parity run at lr 10, `run.py lors --set lr_img=10 --set
lr_txt=10 --set lr_sim=1`: 99 pairs, learned step sizes, low-rank S) trains a student twice, for the paper's 100 (+1)
epochs, and every recall and the student's weights at every evaluation epoch are compared:

- by the official code: LoRS `src/epoch.py` evaluate_synset_with_similarity, called as distill_tesla_lors.py:196 calls
  it (a fresh `CLIPModel_full(args, eval_stage=args.transfer)`, the set's images, texts, step sizes and S matrix, the
  official test loader and its cached test-caption embeddings); its SimilarityDataloader, SGD (momentum 0.9, weight
  decay 5e-4, the two step sizes), MultiStepLR at epoch//2+1, WBCE of its MultilabelContrastiveLoss, epoch_test and
  itm_eval after epochs 0, 10, ..., 100, best r_mean kept;
- by mmdd: `mmdd.evaluate.stage.run_evaluate` (what `mmdd evaluate` runs) with `protocol=lors` on the same set, data
  and model as the parity run, replaying the official student's draws through `student_draws.replay`
  (mmdd.evaluate.student_draws): its initial weights, each step's mini-batch (np.random.shuffle, first batch_train)
  and each dropout mask of its text projection.

Both sides read the same test-caption embeddings (the official run's cache, with a small seeded jitter that breaks
the exact score ties of this dataset's repeated captions; see evaluate.py) and the same test images (compared
below). Patched in the official call, only while it runs: 'cuda' -> CPU in Tensor.to / Module.to (epoch_test and
CLIPModel_full hard-code .to('cuda')), topk's k capped at the row length (epoch_test's k=128 > 100 test images), and
recorders around np.random.shuffle, F.dropout, epoch_test and itm_eval (each calls the original). Writes
<work>/students/parity_students.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import official_modules  # noqa: E402
from run import LORS, METHODS, git_commit, mmdd_common, on_lors_run, relative  # noqa: E402

LR10 = "_lr_img10_lr_txt10_lr_sim1.0"  # the folder suffix of `run.py lors --set lr_img=10 --set lr_txt=10 --set lr_sim=1`
NAMES = {"ir1": "img_r1", "ir5": "img_r5", "ir10": "img_r10", "tr1": "txt_r1", "tr5": "txt_r5", "tr10": "txt_r10",
         "r_mean": "r_mean"}  # mmdd's metric keys -> the official itm_eval's


def add_arguments(parser) -> None:
    parser.add_argument("--synthetic", type=Path, default=None, help="the set to train on (default: the parity run's "
                        "own, <work>/mmdd/mmdd/synthetic)")
    parser.add_argument("--epochs", type=int, default=100, help="the official --epoch_eval_train (it trains one more)")
    parser.add_argument("--float64", action="store_true", help="both sides in double precision (the official one "
                        "under default dtype float64 with Tensor.float() kept double, mmdd under hardware.precision="
                        "64-true): tells a different computation from float32 rounding")
    parser.add_argument("--jitter", type=float, default=0.05, help="test-caption embedding jitter, in units of their "
                        "std (0: the embeddings as cached, exact ties and all)")


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def on_cpu(arg):
    return "cpu" if isinstance(arg, str) and arg.startswith("cuda") else arg


class OfficialStudent:
    """Runs the official evaluate_synset_with_similarity and records its draws, scores and recalls."""

    def __init__(self, official: Path, cwd: Path):
        self.official, self.cwd = official, cwd
        self.steps: list[dict] = []  # per training step: the batch, its dropout masks
        self.evaluations: list[dict] = []  # per evaluation: its recalls (itm_eval's dict)
        self.weights_at_eval: list[dict[str, torch.Tensor]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def run(self, syn, test_set, embed: torch.Tensor, epochs: int, batch_train: int, float64: bool = False) -> dict:
        official_data, _, _ = official_modules(self.official)  # noqa: F841 (puts the checkout on the path, stubs)
        import src.epoch as epoch
        import src.networks as networks
        import torch.nn.functional as F

        args = SimpleNamespace(
            image_encoder="nfnet", text_encoder="bert", image_pretrained=False, image_trainable=True,
            text_pretrained=True, text_trainable=False, only_has_image_projection=False, distill=True,
            loss_type=LORS["loss_type"], transfer=False, device="cpu", epoch_eval_train=epochs, batch_train=batch_train)
        tensor_to, module_to, topk = torch.Tensor.to, torch.nn.Module.to, torch.Tensor.topk
        shuffle, dropout, epoch_test, itm_eval = np.random.shuffle, F.dropout, epoch.epoch_test, epoch.itm_eval
        rec = self

        def rec_shuffle(x, *a, **k):
            shuffle(x, *a, **k)
            rec.steps.append({"batch": [int(i) for i in x[:batch_train]], "masks": []})

        def rec_dropout(input, p=0.5, training=True, inplace=False):
            out = dropout(input, p, training, inplace)
            if training and p > 0:
                rec.steps[-1]["masks"].append((out != 0).to(torch.uint8).cpu())
            return out

        def rec_epoch_test(loader, model, device, bert_test_embed):
            rec.weights_at_eval.append({f"{m}.{i}": p.detach().clone() for m, module in
                                        (("image", model.image_encoder), ("text", model.text_projection))
                                        for i, p in enumerate(module.parameters())})
            return epoch_test(loader, model, device, bert_test_embed)

        def rec_itm_eval(*a, **k):
            result = itm_eval(*a, **k)
            rec.evaluations.append({k: float(v) for k, v in result.items()})
            return result

        def capped_topk(self, k, *a, **kw):
            dim = kw.get("dim", a[0] if a else -1)
            return topk(self, min(k, self.shape[dim]), *a, **kw)

        here = Path.cwd()
        os.chdir(self.cwd)  # get_bert_stuff reads ./distill_utils/checkpoints/bert-base-uncased (the stand-in)
        try:
            with contextlib.ExitStack() as stack:
                for obj, name, value in [
                    (torch.Tensor, "to", lambda s, *a, **k: tensor_to(s, *map(on_cpu, a), **{n: on_cpu(v) for n, v in k.items()})),
                    (torch.nn.Module, "to", lambda s, *a, **k: module_to(s, *map(on_cpu, a), **{n: on_cpu(v) for n, v in k.items()})),
                    (torch.Tensor, "topk", capped_topk), (np.random, "shuffle", rec_shuffle), (F, "dropout", rec_dropout),
                    (epoch, "epoch_test", rec_epoch_test), (epoch, "itm_eval", rec_itm_eval)]:
                    stack.enter_context(patched(obj, name, value))
                dtype = torch.float64 if float64 else torch.float32
                if float64:  # as official.py's PATCHES_FLOAT64: new parameters double, .float() keeps double
                    stack.enter_context(default_dtype(torch.float64))
                    stack.enter_context(patched(torch.Tensor, "float", lambda t, memory_format=torch.preserve_format:
                                                t.to(torch.float64, memory_format=memory_format)))
                    embed = embed.double()
                np.random.seed(0)
                torch.manual_seed(0)
                net = networks.CLIPModel_full(args, eval_stage=args.transfer)
                self.initial = {f"{m}.{i}": p.detach().clone() for m, module in
                                (("image", net.image_encoder), ("text", net.text_projection))
                                for i, p in enumerate(module.parameters())}
                loader = torch.utils.data.DataLoader(test_set, batch_size=64, shuffle=False)
                lrs = syn.lr_values()
                with torch.no_grad():
                    similarity = syn.similarity_matrix()
                t0 = time.perf_counter()
                _, _, best = epoch.evaluate_synset_with_similarity(
                    0, net, syn.images.detach().to(dtype), syn.texts.detach().to(dtype), lrs["image"], lrs["text"],
                    similarity.detach().to(dtype), loader, args, embed)
                seconds = time.perf_counter() - t0
        finally:
            os.chdir(here)
        return {"best": {k: float(v) for k, v in best.items()}, "seconds": seconds}

    def write_draws(self, folder: Path) -> None:
        """The official student's draws as an mmdd student-draws folder (mmdd.evaluate.student_draws)."""
        from safetensors.torch import save_file

        from mmdd.evaluate.student_draws import INIT_FILE
        from mmdd.methods.draws import write_draws
        from mmdd.utils.io import atomic_write

        iterations, masks = [], {}
        for k, step in enumerate(self.steps):
            for j, m in enumerate(step["masks"]):
                masks[f"{k}.{j}"] = m.contiguous()
            iterations.append({"expert": None, "start": None, "batches": [step["batch"]], "blends": None,
                               "dropout_calls": len(step["masks"])})
        write_draws(folder, iterations, masks, source="official:src/epoch.py evaluate_synset_with_similarity")
        initial = {k: v.contiguous() for k, v in self.initial.items()}
        atomic_write(folder / INIT_FILE, lambda p: save_file(initial, str(p)))


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def recording_mmdd_weights(weights: list):
    """mmdd's student's trainable weights whenever it has evaluated (appended to `weights`), in the init file's keys."""
    from mmdd.evaluate.student import StudentModule
    from mmdd.evaluate.student_draws import trainable_tensors

    original = StudentModule.on_validation_epoch_end

    def recording(self):
        before = len(self.history)
        original(self)
        if len(self.history) > before:
            weights.append({k: v.detach().clone() for k, v in trainable_tensors(self.model).items()})
    with patched(StudentModule, "on_validation_epoch_end", recording):
        yield


def mmdd_config(work: Path, image_size: int, synthetic: Path, draws: Path, out: Path, epochs: int, float64: bool):
    """`mmdd evaluate protocol=lors` on the parity run's data and model, the official schedule for `epochs`."""
    from hydra import compose, initialize_config_dir

    from mmdd.paths import conf_dir

    overrides = [*mmdd_common(work, image_size, METHODS["lors"]), "protocol=lors", f"synthetic={synthetic}",
                 "protocol.num_seeds=1", f"protocol.epochs={epochs + 1}", f"protocol.lr_decay_epoch={epochs // 2 + 1}",
                 f"protocol.eval_every={max(1, epochs // 10)}", f"protocol.batch_size={128}",
                 f"student_draws.replay={draws}", f"paths.output_dir={out}",
                 f"hardware.precision={'64-true' if float64 else '32-true'}"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def main() -> int:
    args, official, work, inputs = on_lors_run(__doc__, "LoRS_Distill", add_arguments, suffix=LR10)
    from mmdd.data.datamodule import load_data
    from mmdd.data.transforms import normalize
    from mmdd.evaluate.stage import run_evaluate
    from mmdd.synthetic.synthetic_set import SyntheticSet

    synthetic = (args.synthetic or work / "mmdd" / "mmdd" / "synthetic").resolve()
    if not (synthetic / "manifest.json").exists():
        raise SystemExit(f"no synthetic set at {synthetic}: run `run.py lors --official <LoRS_Distill> --set lr_img=10 "
                         "--set lr_txt=10 --set lr_sim=1` first, or pass --synthetic")
    out = work / ("students_float64" if args.float64 else "students")
    syn, manifest = SyntheticSet.load(synthetic)
    cfg = mmdd_config(work, args.image_size, synthetic, out / "official_draws", out / "mmdd", args.epochs, args.float64)
    data = load_data(cfg, splits=("train", "val", "test"))
    test = data["test"]

    # The official side's inputs: its test loader and its cached BERT embeddings of the test captions (jittered).
    official_data, _, _ = official_modules(official)
    _, _, test_set = official_data.create_dataset(SimpleNamespace(
        image_size=args.image_size, no_aug=False, dataset="flickr", image_root=str(inputs["image_root"]) + "/",
        ann_root=str(inputs["ann_root"])))
    cached = torch.from_numpy(np.load(work / "official" / "cwd" / "flickr_bert_text_embed.npz")["bert_test_embed"])
    embed = cached + args.jitter * cached.std() * torch.randn(cached.shape, generator=torch.Generator().manual_seed(0))
    theirs_images = torch.stack([test_set[i][0] for i in range(len(test_set))])
    ours_images = normalize(test.image_batch(range(test.num_images)), cfg.data.mean, cfg.data.std)
    inputs_check = {"test_images": relative(ours_images, theirs_images),
                    "test_caption_embeddings_mmdd_vs_official_cache": relative(test.text_emb, cached)}

    student = OfficialStudent(official, work / "official" / "cwd")
    ran = student.run(syn, test_set, embed, args.epochs, int(cfg.protocol.batch_size), args.float64)
    student.write_draws(out / "official_draws" / "student_0")

    weights = []
    (out / "mmdd" / "results.json").unlink(missing_ok=True)  # a fresh student (not resumed: the jitter is not in its hash)
    t0 = time.perf_counter()
    with recording_mmdd_weights(weights):
        results = run_evaluate(cfg, synthetic, data={**data, "test": replace(test, text_emb=embed.double() if args.float64 else embed)},
                               out_dir=out / "mmdd")
    mmdd_seconds = time.perf_counter() - t0
    history = results["seeds"][0]["history"]
    eval_epochs = sorted(set(range(0, args.epochs + 1, max(1, args.epochs // 10))) | {args.epochs})
    if [h["epoch"] for h in history] != eval_epochs or len(student.evaluations) != len(eval_epochs):
        raise SystemExit(f"evaluation epochs differ: mmdd {[h['epoch'] for h in history]}, official "
                         f"{len(student.evaluations)} evaluations at {eval_epochs}")
    rows = []
    for ep, ours, theirs, w_ours, w_theirs in zip(eval_epochs, history, student.evaluations, weights,
                                                  student.weights_at_eval):
        rows.append({"epoch": ep, **{k: {"official": theirs[v], "mmdd": ours[k]} for k, v in NAMES.items()},
                     "largest_difference": max(abs(theirs[v] - ours[k]) for k, v in NAMES.items()),
                     "weights_relative": max(relative(w_ours[n], w_theirs[n]) for n in w_theirs),
                     "weights_worst": max(w_theirs, key=lambda n: relative(w_ours[n], w_theirs[n])),
                     "weights_relative_by_tensor": {n: relative(w_ours[n], w_theirs[n]) for n in w_theirs}})
    best = results["seeds"][0]["selected"]
    result = {
        "official_commit": git_commit(official), "synthetic": str(synthetic), "pairs": len(syn),
        "lrs": syn.lr_values(), "loss": manifest.get("inner_loss"), "wbce_log_eps": manifest.get("wbce_log_eps"),
        "epochs": args.epochs + 1, "float64": args.float64, "steps": len(student.steps), "jitter": args.jitter, "inputs": inputs_check,
        "evaluations": rows,
        "largest_recall_difference": max(r["largest_difference"] for r in rows),
        "best": {k: {"official": ran["best"][v], "mmdd": best[k]} for k, v in NAMES.items()},
        "best_epoch_mmdd": results["seeds"][0]["best_epoch"],
        "seconds": {"official": ran["seconds"], "mmdd_evaluate": mmdd_seconds},
        "command": " ".join(["python", "experiments/parity/students.py", *sys.argv[1:]]),
    }
    (out / "parity_students.json").write_text(json.dumps(result, indent=2))
    print(f"inputs: test images relative {inputs_check['test_images']:.1e}; {len(student.steps)} steps replayed")
    for r in rows:
        print(f"epoch {r['epoch']:3d}: " + " ".join(f"{k} {r[k]['official']:.2f}/{r[k]['mmdd']:.2f}" for k in NAMES)
              + f" | largest difference {r['largest_difference']:.2f}, weights {r['weights_relative']:.1e} "
              f"({r['weights_worst']})")
    print(f"largest recall difference over {len(rows)} evaluations: {result['largest_recall_difference']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
