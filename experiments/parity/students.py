"""The students' training against the official evaluations: `python experiments/parity/students.py {lors,mtt_vl,repblend} --official <checkout>`.

One fixed synthetic set (the parity run's own: `run.py lors --set lr_img=10 --set lr_txt=10 --set lr_sim=1`, 99
pairs with learned step sizes and a low-rank S; `run.py mtt_vl`, 99 pairs; RepBlend: `--synthetic`, a set with
positive learned step sizes) trains one student twice, for the official number of epochs, and every recall and the
student's weights at every evaluation are compared:

- by the official code, called as its distillation script calls it on a fresh `CLIPModel_full(args,
  eval_stage=args.transfer)`, the set's images, texts, step sizes (and S), the official test loader and the cached
  test-caption embeddings:
  LoRS `src/epoch.py` evaluate_synset_with_similarity (distill_tesla_lors.py:196): SimilarityDataloader, one SGD
  (momentum 0.9, weight decay 5e-4, the two step sizes), MultiStepLR at epoch//2+1, its MultilabelContrastiveLoss
  WBCE, epoch_test + itm_eval after epochs 0, 10, ..., 100, the best r_mean reported;
  MTT-VL `epoch.py` evaluate_synset (distill.py:231): a shuffled DataLoader, two SGDs at the learned image step
  size, InfoNCE at 1/0.07, the test split once, after epoch 50;
  RepBlend `src/epoch.py` evaluate_synset_with_similarity (distill_repblend.py:227): LoRS's loop training an image
  projection and the text projection on its frozen nfnet_l0 (the parity run's random backbone file), the test
  split after epochs 0, 20, ..., 100;
- by mmdd: `mmdd.stages.evaluate.run_evaluate` (what `mmdd evaluate` runs) with `protocol=<method>` on
  the same set, data and model as the parity run, replaying the official student's draws through
  `student_draws.replay` (mmdd.evaluate.student_draws): its initial weights, each step's mini-batch and each dropout
  mask of its text projection.

Both sides read the same test-caption embeddings (the official run's cache, with a small seeded jitter that breaks
the exact score ties of this dataset's repeated captions; see evaluate.py) and the same test images (compared
below). Patched in the official call, only while it runs: 'cuda' -> CPU in Tensor.to / Module.to (the code hard-codes
.to('cuda')), topk's k capped at the row length (epoch_test's k=128 > 100 test images), MTT-VL's hub BERT -> the
stand-in, and recorders around np.random.shuffle (LoRS's batches), BatchSampler.__iter__ (MTT-VL's DataLoader), the
network's forward (a training step), F.dropout, epoch_test and itm_eval, each calling the original. `--float64`: both
sides in double precision. Writes <work>/students[_float64]/parity_students.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import capped_topk  # noqa: E402  (epoch_test's topk(k=128) capped at the row length)
from official import _cpu as on_cpu  # noqa: E402  ('cuda' -> 'cpu', as official.py's device patch)
from run import LORS, METHODS, REPO, git_commit, mmdd_common, prepare, relative  # noqa: E402

LR10 = "_lr_img10_lr_txt10_lr_sim1.0"  # the folder suffix of `run.py lors --set lr_img=10 --set lr_txt=10 --set lr_sim=1`
NAMES = {"ir1": "img_r1", "ir5": "img_r5", "ir10": "img_r10", "tr1": "txt_r1", "tr5": "txt_r5", "tr10": "txt_r10",
         "r_mean": "r_mean"}  # mmdd's metric keys -> the official itm_eval's


def add_arguments(parser) -> None:
    parser.add_argument("--synthetic", type=Path, default=None, help="the set to train on (default: the parity run's "
                        "own, <work>/mmdd/mmdd/synthetic)")
    parser.add_argument("--epochs", type=int, default=None, help="the official --epoch_eval_train (it trains one "
                        "more; default: the script's, LoRS 100, MTT-VL 50)")
    parser.add_argument("--lr", type=float, default=None, help="train both towers at this step size on both sides "
                        "(mmdd: protocol.lr_source=fixed) instead of the set's learned ones (e.g. a set whose learned "
                        "step sizes went negative, which the official code trains with and mmdd refuses)")
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


def official_weights(net, image_module: str = "image_encoder") -> dict[str, torch.Tensor]:
    """The official student's trained weights, keyed as mmdd's init file (the image side, then the text projection)."""
    return {f"{m}.{i}": p.detach().clone() for m, module in (("image", getattr(net, image_module)),
                                                              ("text", net.text_projection))
            for i, p in enumerate(module.parameters())}


@dataclass(frozen=True)
class Spec:
    """One official evaluation: its checkout, mmdd's protocol, and its schedule for --epochs E."""

    checkout: str
    protocol: str
    suffix: str  # the parity run's folder is outputs/parity/<method>_<size>px<suffix>
    epochs: int  # the official --epoch_eval_train default
    schedule: Callable[[int], list[str]]  # mmdd's protocol overrides for E
    eval_epochs: Callable[[int], list[int]]  # the epochs after which the official code evaluates
    image_module: str = "image_encoder"  # the official student's trained image side (RepBlend: its image projection)


SPECS = {
    # LoRS src/epoch.py:260-303: range(E + 1) epochs, MultiStepLR at E//2 + 1, the test split after epochs 0, E//10,
    # ... and E, the best r_mean kept; batches from SimilarityDataloader (np.random.shuffle per batch)
    "lors": Spec("LoRS_Distill", "lors", LR10, 100,
                 lambda e: [f"protocol.epochs={e + 1}", f"protocol.lr_decay_epoch={e // 2 + 1}",
                            f"protocol.eval_every={max(1, e // 10)}"],
                 lambda e: sorted(set(range(0, e + 1, max(1, e // 10))) | {e})),
    # MTT-VL epoch.py:164-195: range(E + 1) epochs at the learned image step size, both towers; the x0.1 after the
    # last; the test split read once, after it; batches from a shuffled DataLoader (a torch.randperm per epoch)
    "mtt_vl": Spec("multimodal_dataset_distillation", "mtt_vl", "", 50,
                   lambda e: [f"protocol.epochs={e + 1}", f"protocol.lr_decay_epoch={e + 1}",
                              f"protocol.eval_every={e + 1}"],
                   lambda e: [e]),
    # RepBlend src/epoch.py:265-310: LoRS's loop on a frozen nfnet_l0 (its 'pretrained' file: the parity run's random
    # backbone) with an image projection; the test split after epochs 0, E//5, ..., E
    "repblend": Spec("RepBlend", "repblend", LR10, 100,
                     lambda e: [f"protocol.epochs={e + 1}", f"protocol.lr_decay_epoch={e // 2 + 1}",
                                f"protocol.eval_every={max(1, e // 5)}"],
                     lambda e: sorted(set(range(0, e + 1, max(1, e // 5))) | {e}), image_module="image_projection"),
}


class OfficialStudent:
    """Runs the official evaluation of `method` on a set and records its draws, the student's weights at each
    evaluation and the recalls."""

    def __init__(self, method: str, official: Path, cwd: Path, standin: Path):
        self.method, self.official, self.cwd, self.standin = method, official, cwd, standin
        self.steps: list[dict] = []  # per training step: the batch, its dropout masks
        self.pending: list[list[int]] = []  # batches drawn, not yet trained on
        self.evaluations: list[dict] = []  # per evaluation: its recalls (itm_eval's dict)
        self.weights_at_eval: list[dict[str, torch.Tensor]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def modules(self):
        """The checkout's evaluation and network modules (its own imports: stubs for what it never calls)."""
        from official import patch_hub, patch_tokenizer, stub_missing

        stub_missing(["clip", "kornia", "sklearn.metrics.pairwise"])
        patch_tokenizer()
        sys.path.insert(0, str(self.official))
        if self.method in ("lors", "repblend"):
            import src.epoch as epoch
            import src.networks as networks
        else:  # MTT-VL's networks.py loads 'bert-base-uncased' at import: the stand-in
            patch_hub({"bert-base-uncased": str(self.standin)})
            import epoch
            import networks
        return epoch, networks

    def args(self, epochs: int, batch_train: int, lr_image: float) -> SimpleNamespace:
        heads = self.method == "repblend"  # a frozen backbone read from its 'pretrained' file, an image projection
        return SimpleNamespace(
            image_encoder="nfnet", text_encoder="bert", image_pretrained=heads, image_trainable=not heads,
            text_pretrained=True, text_trainable=False, only_has_image_projection=heads, distill=True,
            loss_type=LORS["loss_type"], transfer=False, device="cpu", epoch_eval_train=epochs, batch_train=batch_train,
            lr_net=lr_image)  # MTT-VL: distill.py:229 sets args.lr_net = syn_lr_img before evaluate_synset

    def run(self, syn, test_set, embed: torch.Tensor, epochs: int, batch_train: int, float64: bool = False,
            lr: float | None = None) -> dict:
        import torch.nn.functional as F

        epoch, networks = self.modules()
        image_module = SPECS[self.method].image_module
        lrs = syn.lr_values() if lr is None else {"image": lr, "text": lr}
        args = self.args(epochs, batch_train, lrs["image"])
        tensor_to, module_to, topk = torch.Tensor.to, torch.nn.Module.to, torch.Tensor.topk
        batch_iter = torch.utils.data.BatchSampler.__iter__
        shuffle, dropout, epoch_test, itm_eval = np.random.shuffle, F.dropout, epoch.epoch_test, epoch.itm_eval
        forward = networks.CLIPModel_full.forward
        rec = self

        def rec_shuffle(x, *a, **k):  # LoRS's SimilarityDataloader: a shuffle per batch, its first batch_train
            shuffle(x, *a, **k)
            rec.pending.append([int(i) for i in x[:batch_train]])

        def rec_batches(sampler):  # MTT-VL's shuffled DataLoader: the index batches its BatchSampler yields
            shuffled = isinstance(sampler.sampler, torch.utils.data.RandomSampler)  # not the test loader's
            for batch in batch_iter(sampler):
                if shuffled:
                    rec.pending.append([int(i) for i in batch])
                yield batch

        def rec_forward(net, *a, **k):  # a training step (the evaluation calls the encoders, not forward)
            rec.steps.append({"batch": rec.pending.pop(0), "masks": []})
            return forward(net, *a, **k)

        def rec_dropout(input, p=0.5, training=True, inplace=False):
            out = dropout(input, p, training, inplace)
            if training and p > 0:
                rec.steps[-1]["masks"].append((out != 0).to(torch.uint8).cpu())
            return out

        def rec_epoch_test(loader, model, *a):  # RepBlend's takes use_image_projection before the embeddings
            rec.weights_at_eval.append(official_weights(model, image_module))
            return epoch_test(loader, model, *a)

        def rec_itm_eval(*a, **k):
            result = itm_eval(*a, **k)
            rec.evaluations.append({k: float(v) for k, v in result.items()})
            return result

        here = Path.cwd()
        os.chdir(self.cwd)  # LoRS's get_bert_stuff reads ./distill_utils/checkpoints/bert-base-uncased (the stand-in)
        try:
            with contextlib.ExitStack() as stack:
                for obj, name, value in [
                    (torch.Tensor, "to", lambda s, *a, **k: tensor_to(s, *map(on_cpu, a), **{n: on_cpu(v) for n, v in k.items()})),
                    (torch.nn.Module, "to", lambda s, *a, **k: module_to(s, *map(on_cpu, a), **{n: on_cpu(v) for n, v in k.items()})),
                    (torch.Tensor, "topk", capped_topk(topk)), (np.random, "shuffle", rec_shuffle), (F, "dropout", rec_dropout),
                    (torch.utils.data.BatchSampler, "__iter__", rec_batches), (networks.CLIPModel_full, "forward", rec_forward),
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
                self.initial = official_weights(net, image_module)
                loader = torch.utils.data.DataLoader(test_set, batch_size=64, shuffle=False)
                images, texts = syn.images.detach().to(dtype), syn.texts.detach().to(dtype)
                t0 = time.perf_counter()
                if self.method in ("lors", "repblend"):
                    with torch.no_grad():
                        similarity = syn.similarity_matrix().detach().to(dtype)
                    _, _, best = epoch.evaluate_synset_with_similarity(
                        0, net, images, texts, lrs["image"], lrs["text"], similarity, loader, args, embed)
                else:
                    _, _, best = epoch.evaluate_synset(0, net, images, texts, loader, args, embed)
                seconds = time.perf_counter() - t0
        finally:
            os.chdir(here)
        if self.pending:
            raise SystemExit(f"{len(self.pending)} recorded batches were never trained on: the recorders are wrong")
        return {"best": {k: float(v) for k, v in best.items()}, "seconds": seconds}

    def write_draws(self, folder: Path) -> None:
        """The official student's draws as an mmdd student-draws folder (mmdd.evaluate.student_draws)."""
        from safetensors.torch import save_file

        from mmdd.evaluate.student_draws import INIT_FILE
        from mmdd.utils.draws import write_draws
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


def mmdd_config(method: str, work: Path, image_size: int, synthetic: Path, draws: Path, out: Path, epochs: int,
                float64: bool, lr: float | None = None):
    """`mmdd evaluate protocol=<method>` on the parity run's data and model, the official schedule for `epochs`."""
    from hydra import compose, initialize_config_dir

    from mmdd.paths import conf_dir

    spec = SPECS[method]
    overrides = [*mmdd_common(work, image_size, METHODS[method]), f"protocol={spec.protocol}", f"synthetic={synthetic}",
                 "protocol.num_seeds=1", *spec.schedule(epochs), f"student_draws.replay={draws}",
                 f"paths.output_dir={out}", f"hardware.precision={'64-true' if float64 else '32-true'}",
                 *([] if lr is None else ["protocol.lr_source=fixed", f"protocol.lr={lr}"])]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


@contextlib.contextmanager
def recording_final_weights(weights: list):
    """mmdd's student's trainable weights when its test split is read at the end (the selected checkpoint)."""
    import mmdd.evaluate.student as student
    from mmdd.evaluate.student_draws import trainable_tensors

    original = student.evaluate_retrieval

    def recording(model, *a, **k):
        weights.append({n: v.detach().clone() for n, v in trainable_tensors(model).items()})
        return original(model, *a, **k)
    with patched(student, "evaluate_retrieval", recording):
        yield


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(SPECS))
    parser.add_argument("--official", required=True, type=Path, help="the method's official checkout")
    parser.add_argument("--work", type=Path, default=None, help="the parity run's folder (default "
                        "outputs/parity/<method>_<image size>px[_lr_img10_lr_txt10_lr_sim1.0 for lors])")
    parser.add_argument("--image-size", type=int, default=32, help="the parity run's image size")
    add_arguments(parser)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from mmdd.data.splits import load_data
    from mmdd.data.transforms import normalize
    from mmdd.stages.evaluate import run_evaluate
    from mmdd.synthetic.synthetic_set import SyntheticSet

    spec = SPECS[args.method]
    official = args.official.resolve()
    work = (args.work or REPO / "outputs" / "parity" / f"{args.method}_{args.image_size}px{spec.suffix}").resolve()
    inputs = prepare(work, args.image_size, METHODS[args.method])
    epochs = spec.epochs if args.epochs is None else args.epochs
    synthetic = (args.synthetic or work / "mmdd" / "mmdd" / "synthetic").resolve()
    if not (synthetic / "manifest.json").exists():
        raise SystemExit(f"no synthetic set at {synthetic}: run `run.py {args.method} --official <checkout>` (lors: with "
                         "--set lr_img=10 --set lr_txt=10 --set lr_sim=1) first, or pass --synthetic")
    out = work / ("students_float64" if args.float64 else "students")
    syn, manifest = SyntheticSet.load(synthetic)
    cfg = mmdd_config(args.method, work, args.image_size, synthetic, out / "official_draws", out / "mmdd", epochs,
                      args.float64, args.lr)
    data = load_data(cfg, splits=("train", "val", "test"))
    test = data["test"]

    # The official side's inputs: its test loader and its cached BERT embeddings of the test captions (jittered).
    cwd = work / "official" / "cwd"
    student = OfficialStudent(args.method, official, cwd, work / "standin")
    student.modules()  # the checkout on the path, its imports satisfied
    import data as official_data

    _, _, test_set = official_data.create_dataset(SimpleNamespace(
        image_size=args.image_size, no_aug=False, dataset="flickr", image_root=str(inputs["image_root"]) + "/",
        ann_root=str(inputs["ann_root"])))
    cached = torch.from_numpy(np.load(cwd / "flickr_bert_text_embed.npz")["bert_test_embed"])
    embed = cached + args.jitter * cached.std() * torch.randn(cached.shape, generator=torch.Generator().manual_seed(0))
    theirs_images = torch.stack([test_set[i][0] for i in range(len(test_set))])
    ours_images = normalize(test.image_batch(range(test.num_images)), cfg.data.mean, cfg.data.std)
    inputs_check = {"test_images": relative(ours_images, theirs_images),
                    "test_caption_embeddings_mmdd_vs_official_cache": relative(test.text_emb, cached)}

    ran = student.run(syn, test_set, embed, epochs, int(cfg.protocol.batch_size), args.float64, args.lr)
    student.write_draws(out / "official_draws" / "student_0")

    at_eval, final = [], []
    (out / "mmdd" / "results.json").unlink(missing_ok=True)  # a fresh student (not resumed: the jitter is not in its hash)
    t0 = time.perf_counter()
    with recording_mmdd_weights(at_eval), recording_final_weights(final):
        results = run_evaluate(cfg, synthetic, out_dir=out / "mmdd",
                               data={**data, "test": replace(test, text_emb=embed.double() if args.float64 else embed)})
    mmdd_seconds = time.perf_counter() - t0
    seed = results["seeds"][0]
    # LoRS: every evaluation (Lightning's validation on the test split); MTT-VL (selection=last): the one at the end
    evaluations = seed["history"] or [{"epoch": epochs, **seed["test"]}]
    weights = at_eval if seed["history"] else final
    eval_epochs = spec.eval_epochs(epochs)
    if [h["epoch"] for h in evaluations] != eval_epochs or len(student.evaluations) != len(eval_epochs):
        raise SystemExit(f"evaluation epochs differ: mmdd {[h['epoch'] for h in evaluations]}, official "
                         f"{len(student.evaluations)} evaluations at {eval_epochs}")
    rows = []
    for ep, ours, theirs, w_ours, w_theirs in zip(eval_epochs, evaluations, student.evaluations, weights,
                                                  student.weights_at_eval):
        by_tensor = {n: relative(w_ours[n], w_theirs[n]) for n in w_theirs}
        rows.append({"epoch": ep, **{k: {"official": theirs[v], "mmdd": ours[k]} for k, v in NAMES.items()},
                     "largest_difference": max(abs(theirs[v] - ours[k]) for k, v in NAMES.items()),
                     "weights_relative": max(by_tensor.values()), "weights_worst": max(by_tensor, key=by_tensor.get),
                     "weights_relative_by_tensor": by_tensor})
    result = {
        "method": args.method, "official_commit": git_commit(official), "synthetic": str(synthetic), "pairs": len(syn),
        "lrs": syn.lr_values() if args.lr is None else {"image": args.lr, "text": args.lr}, "loss": manifest.get("inner_loss"), "wbce_log_eps": manifest.get("wbce_log_eps"),
        "epochs": epochs + 1, "float64": args.float64, "steps": len(student.steps), "jitter": args.jitter,
        "inputs": inputs_check, "evaluations": rows,
        "largest_recall_difference": max(r["largest_difference"] for r in rows),
        "largest_weights_relative": max(r["weights_relative"] for r in rows),
        "reported": {k: {"official": ran["best"][v], "mmdd": seed["test"][k]} for k, v in NAMES.items()},
        "seconds": {"official": ran["seconds"], "mmdd_evaluate": mmdd_seconds},
        "command": " ".join(["python", "experiments/parity/students.py", *sys.argv[1:]]),
    }
    (out / "parity_students.json").write_text(json.dumps(result, indent=2))
    print(f"inputs: test images relative {inputs_check['test_images']:.1e}; {len(student.steps)} steps replayed")
    for r in rows:
        print(f"epoch {r['epoch']:3d}: " + " ".join(f"{k} {r[k]['official']:.2f}/{r[k]['mmdd']:.2f}" for k in NAMES)
              + f" | largest difference {r['largest_difference']:.2f}, weights {r['weights_relative']:.1e} "
              f"({r['weights_worst']})")
    print(f"largest recall difference over {len(rows)} evaluations: {result['largest_recall_difference']:.2f}; "
          f"weights {result['largest_weights_relative']:.1e}; reported (official / mmdd): "
          + " ".join(f"{k} {v['official']:.2f}/{v['mmdd']:.2f}" for k, v in result["reported"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
