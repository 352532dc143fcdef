"""`mmdd evaluate`: train K students on a synthetic set, write results.json and print its row.

run(cfg) is the stage; run_evaluate trains the students of one set (resuming finished ones), evaluate_over_ranks
spreads them over the processes of a multi-process distillation."""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mmdd.data.splits import load_data
from mmdd.errors import ArtifactError, MmddError
from mmdd.evaluate.encode import BackboneFeatures
from mmdd.evaluate.retrieval import METRIC_KEYS, chance_report
from mmdd.evaluate.student import StudentPhase, train_student
from mmdd.evaluate.student_draws import student_draws
from mmdd.models.dual_encoder import build_dual_encoder, check_same_frozen_backbone, frozen_backbone_fingerprint
from mmdd.models.losses import DEFAULT_INNER_LOSS
from mmdd.report.table import markdown_table, result_row
from mmdd.synthetic.synthetic_set import SyntheticSet, check_synthetic_compatible
from mmdd.utils.config import config_differences, config_hash, resolved_config, task_overrides, to_plain
from mmdd.identity import data_identity
from mmdd.utils.io import atomic_write_json, stable_hash
from mmdd.utils.seed import student_seed
from mmdd.utils.logging import build_loggers, finish_loggers, log_metrics
from mmdd.utils.trainer import accelerate_model, alone_in_its_trainers, hardware_record

log = logging.getLogger(__name__)


def other_dataset(manifest: dict, cfg, where: Path) -> list[str] | None:
    """How the data under evaluation differs from the set's own ('key: set's -> this run's'), None when it is the
    same. Another dataset is refused unless the run asks for it (allow_other_dataset=true; recorded in results)."""
    recorded = (manifest.get("identity") or {}).get("data")
    if recorded is None:  # sets written before identities were recorded: only the name can be compared
        recorded = {"name": manifest.get("dataset")}
        here = {"name": str(cfg.data.name)}
    else:
        here = data_identity(cfg.data)
    diffs = config_differences({"data": recorded}, {"data": here})
    if not diffs:
        return None
    if not cfg.allow_other_dataset:
        raise ArtifactError(f"synthetic set {where} was distilled on other data than this evaluation's ({'; '.join(diffs)}; "
                            "set -> this run): evaluate with the data settings it was made with, or pass "
                            "allow_other_dataset=true to evaluate it on this data on purpose (recorded in results.json)")
    log.warning("evaluating synthetic set %s on other data than its own (allow_other_dataset): %s", where, "; ".join(diffs))
    return diffs


def distilled_with(cfg) -> tuple[str, int]:
    """This run's text encoder and image size, which a set to evaluate must have been distilled with."""
    return str(cfg.model.text.name_or_path), int(cfg.data.image_size)


def check_frozen_backbone(manifest: dict, model, where: Path) -> None:
    """Students that train heads on a frozen backbone must stand on the one the set was distilled on."""
    check_same_frozen_backbone(f"synthetic set {where}", manifest.get("backbone_fingerprint"),
                               frozen_backbone_fingerprint(model))


def summarize(per_seed: list[dict], key: str = "test") -> tuple[dict, dict]:
    mean, std = {}, {}
    for k in METRIC_KEYS:
        vals = [r[key][k] for r in per_seed]
        mean[k] = statistics.fmean(vals)
        std[k] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std


FULL_TRAIN = "full_train"  # synthetic=full_train: every train pair, for heads-only students (the upper bound)


def full_train_set(cfg, model_cfg, data, text_dim: int, features: BackboneFeatures | None) -> tuple[SyntheticSet, dict]:
    """Every (image, caption) pair of the train split as a 'set' of frozen-backbone features, for students that
    train heads only: the full-data upper bound of the frozen-backbone rows, trained under the students' protocol
    (not the teachers' few epochs). Features come from the evaluation's cache (`features`, computed once per image,
    kept with the val/test ones); the students train at protocol.lr."""
    model = build_dual_encoder(model_cfg, text_dim, cfg.data.image_size)
    if not model.backbone_is_cacheable() or features is None:
        raise MmddError("synthetic=full_train trains heads-only students on a frozen backbone's cached features (e.g. "
                        "model=convnet_heads, or protocol.trainable=heads, with protocol.cache_features=true); a "
                        "trainable backbone's full-data row is the teachers' (mmdd run, or `mmdd table` over a store)")
    train = data["train"]
    lr = float(cfg.protocol.lr)
    syn = SyntheticSet(features.split(model.eval(), train)[train.txt2img], train.text_emb, {"image": lr, "text": lr})
    # No backbone fingerprint: the features are this run's backbone's, so there is nothing to check them against.
    manifest = {"method": FULL_TRAIN, "budget": train.num_images, "seed": cfg.seed, "complete": True,
                "inner_loss": "infonce", "identity": {"data": data_identity(cfg.data)}, "config_hash": None,
                "features": True}
    log.info("full_train: %d pairs of %d-d backbone features of %d train images", len(syn), syn.images.shape[1],
             train.num_images)
    return syn, manifest


def student_lrs(cfg, syn: SyntheticSet, where: Path) -> dict[str, float]:
    """The students' step sizes per modality under protocol.lr_source."""
    lrs = syn.lr_values()
    source = cfg.protocol.lr_source
    if source not in ("learned", "learned_image", "fixed"):
        raise MmddError(f"protocol.lr_source must be learned, learned_image or fixed, got {source!r}")
    if source == "fixed":
        if cfg.protocol.lr <= 0:
            raise MmddError(f"protocol.lr={cfg.protocol.lr}: a fixed student step size must be positive")
        lrs = {m: cfg.protocol.lr for m in lrs}
    elif source == "learned_image":  # MTT-VL's evaluation trains both towers at the learned image step size
        lrs = {m: lrs["image"] for m in lrs}
    for m, v in lrs.items():
        if v <= 0:
            raise MmddError(f"synthetic set {where}: learned step size lr_{m}={v} is not positive; "
                            "use protocol.lr_source=fixed")
    return lrs


def earlier_phases(cfg, manifest: dict, where: Path, text_dim: int) -> list[StudentPhase]:
    """The sets a phased set's students train on first (its manifest's earlier_phases, directories beside it)."""
    phases = []
    names = manifest.get("earlier_phases") or []
    identities = manifest.get("earlier_phase_identities") or [None] * len(names)  # sets before 2026-12-01: none
    for name, identity in zip(names, identities):
        path = where / name
        if not (path / "manifest.json").exists():
            raise ArtifactError(f"synthetic set {where} lists an earlier phase {name}/ that is missing; copy the set "
                                "with its phase_<i>/ directories, or distil it again")
        syn, phase_manifest = SyntheticSet.load(path)
        if identity is not None and phase_manifest.get("phase_identity") != identity:
            raise ArtifactError(f"synthetic set {where}: its earlier phase {name}/ was distilled by another "
                                "configuration than the one the set continues (phase_identity differs from the "
                                "set's earlier_phase_identities); distil the set again into a new directory")
        check_synthetic_compatible(phase_manifest, *distilled_with(cfg), text_dim, path)
        phases.append(student_phase(cfg, syn, path))
    return phases


def student_phase(cfg, syn: SyntheticSet, where: Path) -> StudentPhase:
    """What a student trains on from one set: its pairs, its step sizes (protocol.lr_source) and its S."""
    with torch.no_grad():
        similarity = syn.similarity_matrix()
    return StudentPhase(syn.images, syn.texts, student_lrs(cfg, syn, where), similarity)


def student_loss(protocol, manifest: dict) -> tuple[str, float, float | None]:
    """The students' loss, its label temperature and its wbce log_eps. protocol.loss=set trains as the set was
    distilled: its inner loss with the options it was distilled with (the LoRS/RepBlend/PTM-ST paper sets: wbce in
    the reference code's form, as their official evaluation trains), against its S if it has one."""
    if protocol.loss != "set":
        return str(protocol.loss), float(protocol.label_temperature), None
    log_eps = manifest.get("wbce_log_eps")
    return (str(manifest.get("inner_loss", DEFAULT_INNER_LOSS)),  # sets written before manifests said: infonce
            float(manifest.get("label_temperature", protocol.label_temperature)),
            None if log_eps is None else float(log_eps))


def run_evaluate(cfg, synthetic: str | Path | None = None, data=None, out_dir: str | Path | None = None, label=None) -> dict:
    synthetic = Path(str(synthetic or cfg.synthetic or ""))
    if not str(synthetic) or str(synthetic) == ".":
        raise MmddError("mmdd evaluate needs synthetic=<directory of a synthetic set written by mmdd distill>, or "
                        f"synthetic={FULL_TRAIN}")
    model_cfg = cfg.model
    if cfg.protocol.get("trainable"):  # e.g. the repblend protocol trains the heads only
        model_cfg = OmegaConf.merge(cfg.model, {"trainable": str(cfg.protocol.trainable)})
    data = data or load_data(cfg, splits=("train", "val", "test"))
    text_dim = data["test"].text_emb.shape[1]
    # Frozen-backbone students share one cache of backbone features across seeds (train_student uses it only when
    # the student's backbone is frozen).
    features = BackboneFeatures(cfg.hardware.inference_batch, cache_dir=cfg.paths.cache_dir,
                                data_key=stable_hash(data_identity(cfg.data))) if cfg.protocol.cache_features else None
    if str(synthetic) == FULL_TRAIN:  # its "learned" step sizes are protocol.lr
        syn, manifest = full_train_set(cfg, model_cfg, data, text_dim, features)
        recorded = FULL_TRAIN
    else:
        syn, manifest = SyntheticSet.load(synthetic)
        check_synthetic_compatible(manifest, *distilled_with(cfg), text_dim, synthetic)
        recorded = str(synthetic.resolve())
    out_dir = Path(out_dir or cfg.paths.output_dir)
    final = student_phase(cfg, syn, synthetic)
    earlier = earlier_phases(cfg, manifest, synthetic, text_dim)

    def build_model():
        return accelerate_model(build_dual_encoder(model_cfg, text_dim, cfg.data.image_size), cfg.hardware)

    if str(model_cfg.trainable) in ("heads", "text") and manifest.get("backbone_fingerprint"):
        check_frozen_backbone(manifest, build_dual_encoder(model_cfg, text_dim, cfg.data.image_size), synthetic)
    data_differences = other_dataset(manifest, cfg, synthetic)

    label = label or manifest.get("method", "synthetic")
    loss, label_temperature, log_eps = student_loss(cfg.protocol, manifest)
    indices = student_indices(cfg)
    seeds = [student_seed(cfg.seed, k) for k in indices]
    results_path = out_dir / "results.json"
    this_hash = config_hash(cfg)
    per_seed = finished_seeds(results_path, this_hash, manifest.get("config_hash"), seeds)
    done = {r["seed"] for r in per_seed}
    if done:
        log.info("%s: resuming, %d of %d student seeds already in %s", label, len(done), len(seeds), results_path)
    t0 = time.perf_counter()

    def results(complete: bool) -> dict:
        mean, std = summarize(per_seed)
        val = [r["selected"]["r_mean"] for r in per_seed if r.get("selected")] if cfg.protocol.selection == "val" else []
        return {
            "label": label,
            "method": manifest.get("method"),
            "budget": manifest.get("budget"),
            "dataset": str(cfg.data.name),
            "seed": manifest.get("seed", cfg.seed),  # the distillation seed (students: seeds[*].seed)
            "protocol": to_plain(cfg.protocol),
            "synthetic": recorded,
            "synthetic_config_hash": manifest.get("config_hash"),
            "other_dataset": data_differences,  # None, or how this data differs from the set's (allow_other_dataset)
            "config_hash": this_hash,
            "complete": complete,
            "expected_seeds": len(seeds),
            "num_seeds": len(per_seed),
            "seeds": per_seed,
            "mean": mean,
            "std": std,
            # What a sweep may optimise: val r_mean of the selected checkpoints (never test); None unless
            # the protocol selects on val.
            "objective": statistics.fmean(val) if val else None,
            "chance": chance_report(data["test"].txt2img, data["test"].num_images, [r["test"]["r_mean"] for r in per_seed]),
            "timings": {"evaluate_seconds": time.perf_counter() - t0},
            "hardware": hardware_record(cfg.hardware),  # the students'
            "synthetic_hardware": manifest.get("hardware"),  # the distillation's (None: a set made before 2026-12-06)
            "distill_stats": manifest.get("distill_stats"),
            "overrides": task_overrides(),
            "config": resolved_config(cfg),
        }

    for index, s in zip(indices, seeds):
        if s in done:
            continue
        loggers = build_loggers(cfg, job_type="evaluate", name=f"{label}_b{manifest.get('budget')}_student{s}",
                                extra_config={"synthetic_set": {"label": label, "method": manifest.get("method"),
                                                                "budget": manifest.get("budget"),
                                                                "seed": manifest.get("seed"), "path": str(synthetic)},
                                              "student_seed": s}, save_dir=out_dir)
        try:
            res = train_student(cfg, build_model, final.images, final.texts, final.lrs, data, seed=s, loggers=loggers,
                                loss=loss, similarity=final.similarity, label_temperature=label_temperature,
                                features=features, inputs_are_features=bool(manifest.get("features")), earlier=earlier,
                                log_eps=log_eps, draws=student_draws(cfg, index))
            log_metrics(loggers, {f"test/{k}": v for k, v in res.test.items()})
        finally:
            finish_loggers(loggers)
        log.info("%s seed %d: test r_mean %.2f (epoch %d)", label, s, res.test["r_mean"], res.best_epoch)
        per_seed.append(asdict(res))
        # After every seed, so a killed evaluation keeps the finished ones (complete: false until the last).
        atomic_write_json(results_path, results(complete=len(per_seed) == len(seeds)))
    final = results(complete=True)
    atomic_write_json(results_path, final)
    chance = final["chance"]
    if chance["all_at_chance"]:
        log.warning("%s: all %d students score at chance (test r_mean <= %.2f, chance %.2f): the set taught them "
                    "nothing. Check the set (its manifest's value_range, the learning rates it was distilled with) and "
                    "the store it came from; recorded in %s", label, chance["of"], chance["threshold"],
                    chance["r_mean"], results_path)
    return final


def wait_for_the_set(synthetic, since: float, poll: float = 1.0) -> None:
    """A process > 0 of a distillation returns before process 0 has written the set: wait for a complete manifest
    written after `since` (this stage's start; a finished set of an earlier run in the same directory is older)."""
    path = Path(str(synthetic)) / "manifest.json"
    while True:
        try:
            if path.stat().st_mtime >= since and json.loads(path.read_text()).get("complete"):
                return
        except (OSError, json.JSONDecodeError):
            pass  # not there yet, or being replaced
        time.sleep(poll)


def evaluate_over_ranks(cfg, synthetic, data, rank: int, world: int, since: float, poll: float = 2.0) -> dict | None:
    """The students of a set distilled by `world` processes, spread over them: process r trains students r, r + world,
    ... on its own device into `<run>/students_by_rank/rank_<r>/results.json`; process 0 then waits for the others'
    (a process that dies ends the run: mmdd.utils.ddp / SLURM_KILL_BAD_EXIT), gathers every student into the run's
    results.json and returns its results, as one process training them all would (the same seeds). Others: None."""
    indices = student_indices(cfg)
    parts = Path(str(cfg.paths.output_dir)) / "students_by_rank"
    mine = indices[rank::world]
    if rank != 0:
        wait_for_the_set(synthetic, since)
    if mine:
        own = OmegaConf.merge(cfg, {"students": mine})
        with alone_in_its_trainers():  # each process's students log their runs (W&B, CSV) as process 0's do
            run_evaluate(own, synthetic, data, out_dir=parts / f"rank_{rank}")
    if rank != 0:
        return None
    waiting = [r for r in range(world) if indices[r::world]]  # process 0's own part is written by now
    parts_done, said = {}, False
    while waiting:
        for r in list(waiting):
            path = parts / f"rank_{r}" / "results.json"
            part = json.loads(path.read_text()) if path.exists() else {}
            if part.get("complete"):
                parts_done[r] = part
                waiting.remove(r)
        if waiting:
            if not said:
                log.info("waiting for the students of processes %s", waiting)
                said = True
            time.sleep(poll)
    seeds = [s for r in sorted(parts_done) for s in parts_done[r]["seeds"]]
    _, manifest = SyntheticSet.load(Path(str(synthetic)))
    out_dir = Path(str(cfg.paths.output_dir))
    # In the form of an interrupted evaluation of this config: run_evaluate finds every student done and writes the
    # run's results.json (its mean, std and selection) without training any again.
    atomic_write_json(out_dir / "results.json", {"config_hash": config_hash(cfg), "complete": False,
                                                 "synthetic_config_hash": manifest.get("config_hash"), "seeds": seeds})
    return run_evaluate(cfg, synthetic, data)


def student_indices(cfg) -> list[int]:
    """Which of the protocol's `num_seeds` students this job trains: all of them, or `students=<k>` / `[k, ...]`,
    so that a multirun (`students=0,1,2`) spreads one set's students over jobs; `mmdd table` pools them."""
    n = cfg.protocol.num_seeds
    chosen = cfg.students
    if chosen is None:
        return list(range(n))
    try:
        idx = [int(chosen)] if isinstance(chosen, (int, str)) else [int(k) for k in chosen]
    except (TypeError, ValueError):
        raise MmddError(f"students={chosen}: give a student index or a list of them, e.g. students=0 or "
                        "students=[0,2]") from None
    bad = [k for k in idx if not 0 <= k < n]
    if bad or not idx:
        raise MmddError(f"students={chosen}: indices must lie in 0..{n - 1} (protocol.num_seeds={n})")
    return sorted(set(idx))


def finished_seeds(path: Path, cfg_hash: str, synthetic_hash: str | None, seeds: list[int]) -> list[dict]:
    """Student results already in `path` from an interrupted run of this same config and set."""
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable %s; its seeds are re-run", path)
        return []
    if old.get("config_hash") != cfg_hash or old.get("synthetic_config_hash") != synthetic_hash:
        return []
    return [r for r in old.get("seeds", []) if r.get("seed") in seeds]


def evaluate_and_print(cfg, synthetic=None, data=None) -> float | None:
    results = run_evaluate(cfg, synthetic, data)
    print(markdown_table([result_row(results)]))
    return results["objective"]


def run(cfg) -> float | None:
    return evaluate_and_print(cfg)
