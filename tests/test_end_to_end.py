"""Every stage for real on a tiny embedded dataset: the CLI, Hydra, Lightning, W&B offline."""

import json

import pytest
import torch

from conftest import TINY, run_in_process, run_mmdd, the_store


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    proc = run_mmdd(["run", *TINY, "hydra.run.dir=outputs/run_tiny"], root)
    return root, proc


def test_run_prints_table_and_writes_outputs(tiny_run):
    root, proc = tiny_run
    out = root / "outputs" / "run_tiny"
    assert "| mtt_vl | 8 | 2 |" in proc.stdout
    assert "| random | 8 | 2 |" in proc.stdout
    assert "full train (teachers)" in proc.stdout
    # composed config saved with the run
    assert (out / ".hydra" / "config.yaml").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["mtt_vl", "random", "full train (teachers)"]
    res = json.loads((out / "evaluate" / "mtt_vl" / "results.json").read_text())
    assert res["num_seeds"] == 2 and len(res["seeds"]) == 2
    assert set(res["mean"]) == {"ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "r_mean"}
    assert res["protocol"]["selection"] == "val"
    for s in res["seeds"]:
        assert 0 <= s["test"]["r_mean"] <= 100
    stats = res["distill_stats"]
    assert stats["iterations"] == 3 and stats["sec_per_iter_median"] > 0 and stats["peak_mem_mb"] > 0
    assert stats["peak_reserved_mb"] is None  # the GPU's caching allocator: none on CPU
    # how the numbers were made, for the students and for the set
    for hw in (res["hardware"], res["synthetic_hardware"]):
        assert hw["precision"] == "32-true" and hw["deterministic"] is False and hw["processes"] == 1
        assert hw["torch"] == torch.__version__ and hw["device"].startswith("cpu")


def test_run_artifacts(tiny_run):
    root, _ = tiny_run
    out = root / "outputs" / "run_tiny"
    syn = out / "synthetic" / "mtt_vl"
    manifest = json.loads((syn / "manifest.json").read_text())
    assert manifest["num_pairs"] == 8 and manifest["complete"] is True
    assert manifest["image_shape"] == [3, 32, 32] and manifest["text_dim"] == 384
    captions = json.loads((syn / "captions.json").read_text())
    assert len(captions) == 8 and all(isinstance(c, str) and c for c in captions)
    assert (syn / "grid.png").stat().st_size > 0
    history = json.loads((syn / "history.json").read_text())
    assert len(history) == 3 and "distill/matching_loss" in history[0]
    # each iteration's wall time from the previous step's end (what timing.py compares with the official loops)
    # holds the step itself
    assert all(h["distill/wall_sec_per_iter"] >= h["distill/sec_per_iter"] > 0 for h in history)
    stores = list((root / "outputs" / "artifacts" / "buffers" / "synscenes").iterdir())
    assert len(stores) == 1 and len(list(stores[0].glob("expert_*.safetensors"))) == 2
    # W&B offline runs (one per expert, distillation and student) with the synthetic images as media
    runs = list(out.rglob("offline-run-*"))
    assert len(runs) == 2 + 2 + 2 + 2  # experts, distill runs (mtt_vl, random), students (2 sets x 2 seeds)
    assert list(out.glob("wandb/offline-run-*/files/media/images/synthetic/*.png"))
    # CSV logs beside W&B, with the distillation speed figures
    distill_csv = next(out.glob("csv/mtt_vl_b8_s0/metrics.csv")).read_text()
    assert "distill/sec_per_iter" in distill_csv and "distill/peak_mem_mb" in distill_csv


def test_stages_separately_and_buffer_resume(tiny_run, tmp_path):
    root, _ = tiny_run
    store = the_store(root)
    # rerun of buffer skips complete experts
    proc = run_in_process(["buffer", *TINY, "logger=none", "hydra.run.dir=outputs/buffer_again"], root, check=True)
    assert "trajectory store:" in proc.stdout
    # distill on its own, then evaluate its output
    run_in_process(["distill", *TINY, "logger=csv", "evaluate=false", f"buffer_dir={store}",
                    "hydra.run.dir=outputs/distill_alone"], root, check=True)
    syn = root / "outputs" / "distill_alone" / "synthetic"
    assert (syn / "manifest.json").exists()
    proc = run_in_process(["evaluate", *TINY, "logger=none", f"synthetic={syn}", "protocol.num_seeds=1",
                           "hydra.run.dir=outputs/eval_alone"], root, check=True)
    assert "| mtt_vl | 8 | 1 |" in proc.stdout
    assert (root / "outputs" / "eval_alone" / "results.json").exists()


def test_budget_larger_than_train_split_is_a_clear_error(tiny_run):
    root, _ = tiny_run
    proc = run_in_process(["distill", *TINY, "logger=none", "budget=100000", "hydra.run.dir=outputs/bad_budget"], root, check=False)
    assert proc.returncode == 2
    assert "budget=100000 is larger than the train split" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_store_for_another_model_is_a_clear_error(tiny_run):
    root, _ = tiny_run
    store = the_store(root)
    proc = run_in_process(["distill", *TINY, "logger=none", "model.image.width=16", f"buffer_dir={store}",
                     "hydra.run.dir=outputs/bad_store"], root, check=False)
    assert proc.returncode == 2
    assert "trainable parameters differ" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lors_distill_and_evaluate_against_S(tiny_run):
    root, _ = tiny_run
    store = the_store(root)
    run_in_process(["distill", *TINY, "method=lors", "method.similarity.rank=2", "logger=none", "evaluate=false",
                    f"buffer_dir={store}", "hydra.run.dir=outputs/lors"], root, check=True)
    syn = root / "outputs" / "lors" / "synthetic"
    manifest = json.loads((syn / "manifest.json").read_text())
    assert manifest["num_pairs"] == 7 and manifest["budget"] == 8  # S pays for one pair
    assert manifest["similarity"]["kind"] == "lowrank" and manifest["inner_loss"] == "wbce"
    proc = run_in_process(["evaluate", *TINY, "logger=none", f"synthetic={syn}", "protocol.num_seeds=1",
                           "hydra.run.dir=outputs/lors_eval"], root, check=True)
    assert "| lors | 8 | 1 |" in proc.stdout


def _table_cells(markdown: str) -> dict[str, tuple]:
    """{method: (budget, evaluations, the seven metric cells)} of a Markdown table from table.md or `mmdd table`."""
    table = [line for line in markdown.strip().splitlines() if line.startswith("|")]  # not the notes below it
    lines = [line.strip("| ").split(" | ") for line in table]
    head, body = lines[0], lines[2:]
    metrics = ["IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean"]
    out = {}
    for cells in body:
        row = dict(zip(head, (c.replace("**", "") for c in cells)))
        seeds = row["seeds"].split("×")  # `mmdd table`: sets×students; table.md: evaluations
        n = int(seeds[0]) * int(seeds[-1]) if len(seeds) == 2 else int(seeds[0])
        out[row["method"]] = (int(row["budget"]), n, tuple(row[k] for k in metrics))
    return out


def test_wandb_table_of_the_quick_start_equals_its_table_md(tiny_run, capsys):
    """Every W&B run says which stage made it (inside `mmdd run` too, whose config says stage `run` for all), all
    of one job's runs are in its wandb/ folder, and the table read back from them is table.md: the students of each
    set and the teachers' full-data row, the teachers never counted as students."""
    from mmdd.commands import table
    from mmdd.report.wandb_offline import read_run

    root, _ = tiny_run
    out = root / "outputs" / "run_tiny"
    jobs = sorted(read_run(f)[0] for f in (out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert jobs == ["buffer"] * 2 + ["distill"] * 2 + ["evaluate"] * 4
    expected = _table_cells((out / "table.md").read_text())
    assert set(expected) == {"mtt_vl", "random", "full train (teachers)"}
    for source in (["--wandb", str(out / "wandb")], [str(out)]):
        capsys.readouterr()
        assert table(source) == 0
        assert _table_cells(capsys.readouterr().out) == expected, source


def test_students_that_learn_nothing_are_reported(tiny_run, capsys):
    """Students that barely move (step size 1e-12) stay at chance: results.json records it and `mmdd table` says so."""
    from mmdd.commands import table

    root, _ = tiny_run
    syn = root / "outputs" / "run_tiny" / "synthetic" / "mtt_vl"
    run_in_process(["evaluate", *TINY, "logger=none", f"synthetic={syn}", "protocol.lr_source=fixed", "protocol.lr=1e-12",
                    "hydra.run.dir=outputs/eval_at_chance"], root, check=True)
    chance = json.loads((root / "outputs" / "eval_at_chance" / "results.json").read_text())["chance"]
    assert chance["all_at_chance"] and chance["of"] == 2 and 0 < chance["r_mean"] < chance["threshold"]
    capsys.readouterr()
    assert table([str(root / "outputs" / "eval_at_chance")]) == 0
    assert "all 2 students score at chance" in capsys.readouterr().err
    trained = json.loads((root / "outputs" / "run_tiny" / "evaluate" / "mtt_vl" / "results.json").read_text())
    assert "all_at_chance" in trained["chance"]


def test_distillation_learns(tiny_run):
    """The distilled set matches the teachers' trajectories better than the real pairs it started from: the
    matching loss of both on every (expert, start epoch) segment of the store, with the same inner batches."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mmdd.data.splits import load_data
    from mmdd.methods.context import MethodContext
    from mmdd.methods.trajectory.objective import build_segment, meta_gradient_for
    from mmdd.models.dual_encoder import build_dual_encoder, frozen_backbone_fingerprint
    from mmdd.paths import conf_dir
    from mmdd.synthetic.synthetic_set import SyntheticSet

    root, _ = tiny_run
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("distill", overrides=[*TINY, f"paths.root_dir={root}", f"paths.output_dir={root}/outputs/check"])
    train = load_data(cfg, splits=("train",))["train"]
    method = instantiate(cfg.method)
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model, train.text_emb.shape[1], int(cfg.data.image_size))
    context = MethodContext.of(cfg, train, root / "outputs" / "check")
    objective = method.make_objective(context, model, frozen_backbone_fingerprint(model))
    settings, store = method.settings, objective.trajectories

    def matching_loss(syn) -> float:
        total = 0.0
        for expert in range(store.n_experts):
            for start in range(settings.max_start_epoch):
                starts, targets = store.segment(expert, start, settings.expert_epochs, torch.device("cpu"))
                seg = build_segment(model, objective.layout, syn, settings, starts, targets, torch.Generator().manual_seed(0))
                loss, _ = meta_gradient_for(settings, model)(seg, lambda t, inputs: None)
                total += float(loss)
        return total

    initial = method.initial_set(context, context.budget)  # the run's own start: same seed
    distilled, _ = SyntheticSet.load(root / "outputs" / "run_tiny" / "synthetic" / "mtt_vl")
    assert not torch.equal(initial.images, distilled.images)
    before, after = matching_loss(initial), matching_loss(distilled)
    print(f"matching loss over every segment: initial pairs {before:.4f}, distilled {after:.4f}")
    assert after < before


def test_cross_architecture_students_stay_apart_and_pivot_by_student(tiny_run, capsys):
    """A set taught to another image encoder (timm ResNet-18) is its own row when read back from W&B (whose runs
    carry no overrides: the model tells the rows apart), and `--by-student` puts the two models' students of the set
    side by side, from results.json (rows named by the distill job, the ResNet's fraction of the ConvNet's score)."""
    from mmdd.commands import table

    root, _ = tiny_run
    out = root / "outputs" / "run_tiny"
    cross_dir = root / "outputs" / "cross_resnet"
    run_in_process(["evaluate", *TINY, f"synthetic={out / 'synthetic' / 'mtt_vl'}", "model=resnet18_minilm",
                    "model.image.width=null", "hydra.run.dir=outputs/cross_resnet"], root, check=True)
    cross = json.loads((cross_dir / "results.json").read_text())
    expected = _table_cells((out / "table.md").read_text())
    capsys.readouterr()
    assert table(["--wandb", str(out / "wandb"), "--wandb", str(cross_dir / "wandb")]) == 0
    rows = _table_cells(capsys.readouterr().out)
    assert rows["mtt_vl (model=convnet_minilm)"] == expected["mtt_vl"]
    assert rows["random (model=convnet_minilm)"] == expected["random"]
    resnet = rows["mtt_vl (model=resnet18_minilm)"]
    assert resnet[1] == cross["num_seeds"] == 2
    assert resnet[2][-1] == f"{cross['mean']['r_mean']:.2f} ± {cross['std']['r_mean']:.2f}"
    assert table([str(out), str(cross_dir), "--by-student"]) == 0
    pivot = capsys.readouterr().out
    row = next(line.strip("| ").split(" | ") for line in pivot.splitlines() if "| mtt_vl" in line)
    own = json.loads((out / "evaluate" / "mtt_vl" / "results.json").read_text())["mean"]["r_mean"]
    other = cross["mean"]["r_mean"]
    assert [cell.replace(" †", "") for cell in row[3:]] == [f"{own:.2f} (1×2)", f"{other:.2f} (1×2)", f"{other / own:.2f}"]
