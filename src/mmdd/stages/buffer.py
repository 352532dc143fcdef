"""`mmdd buffer`: train the experts and record their trajectories into a trajectory store (complete experts are
skipped, experts claimed by another process are left to it)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mmdd.data.splits import PairDataset, check_full_batches, load_data, loader_options, loader_workers
from mmdd.data.transforms import augment_config, per_image_augment
from mmdd.errors import MmddError
from mmdd.evaluate.encode import evaluate_retrieval
from mmdd.evaluate.retrieval import chance_report
from mmdd.models.dual_encoder import build_dual_encoder, frozen_backbone_fingerprint
from mmdd.teachers.store_size import check_store_fits
from mmdd.teachers.claims import ExpertClaims
from mmdd.teachers.expert_module import ExpertModule, TrajectoryRecorder
from mmdd.teachers.global_batch import global_batch_loader, per_rank_batch
from mmdd.teachers.loader_watch import LoaderWatch
from mmdd.teachers.expert_records import training_record
from mmdd.teachers.trajectory_store import TrajectoryStore
from mmdd.utils.config import to_plain
from mmdd.identity import data_identity, data_location, teacher_hash, teachers_identity
from mmdd.utils.io import atomic_write_json, remove_stale_temp_files, stable_hash
from mmdd.utils.logging import build_loggers, finish_loggers, log_metrics
from mmdd.utils.seed import expert_seed, seed_everything
from mmdd.utils.trainer import (accelerate_model, build_trainer, device_label, hardware_processes, hardware_record,
                                 is_rank_zero, process_device)

log = logging.getLogger(__name__)


def run_buffer(cfg, data=None) -> Path:
    """Train `teacher.num_experts` experts (skipping complete ones); return the store path."""
    data = data or load_data(cfg)
    train = data["train"]
    text_dim = train.text_emb.shape[1]
    tcfg = cfg.teacher
    if tcfg.init not in ("per_expert", "shared"):
        raise MmddError(f"teacher.init must be per_expert or shared, got {tcfg.init!r}")
    augment = augment_config(cfg.data.augment if tcfg.augment else None)
    dataset = PairDataset(train, unit=str(cfg.data.train_unit), augment=per_image_augment(augment, train))
    check_full_batches(dataset, tcfg.batch_size, "teacher.batch_size")
    per_rank_batch(tcfg.batch_size, hardware_processes(cfg.hardware))  # before any training
    probe = build_dual_encoder(cfg.model, text_dim, cfg.data.image_size)
    names = probe.modality_parameter_names()
    shapes = {n: list(p.shape) for n, p in probe.named_parameters()}
    check_store_fits(cfg, probe)
    store = TrajectoryStore.create_or_open(
        Path(str(cfg.buffer_dir)),
        dataset=str(cfg.data.name),
        model=str(cfg.model.name),
        config_hash=teacher_hash(cfg),
        param_names=names,
        param_shapes={n: shapes[n] for group in names.values() for n in group},
        epochs=tcfg.epochs,
        teacher=to_plain(tcfg),
        data_hash=stable_hash(data_identity(cfg.data)),
        identity=teachers_identity(cfg),
        data_location=data_location(cfg.data),
        backbone_fingerprint=frozen_backbone_fingerprint(probe),
    )
    # One process per job: experts are claimed, so several `mmdd buffer` jobs fill one store together.
    # One expert across N devices (DDP): the job's ranks go through the experts in step, and rank 0 writes.
    ddp = hardware_processes(cfg.hardware) > 1
    claims = None if ddp else ExpertClaims(store.root, cfg.claim_stale_minutes)
    # Litter of killed runs: temp files of dead writers, claims left on experts that were completed.
    remove_stale_temp_files(store.root)
    if claims is not None:
        claims.release_complete(store.completed_experts())
    busy = []
    check_loader = bool(cfg.data.get("loader_check", True))
    for e in range(tcfg.num_experts):
        if e in store.completed_experts():  # re-listed: another process may have finished it meanwhile
            log.info("expert %d already complete in %s; skipping", e, store.root)
            continue
        if claims is not None and not claims.try_claim(e):
            owner = claims.owner(e) or {}
            log.info("expert %d is being trained by %s (pid %s); skipping", e, owner.get("host"), owner.get("pid"))
            busy.append(e)
            continue
        if claims is not None and e in store.completed_experts():  # finished between the two checks
            claims.release(e)
            continue
        shared = tcfg.init == "shared"  # expert 0's initialisation for every expert, each its own data order, dropout
        seed_everything(expert_seed(tcfg.seed, 0 if shared else e))
        model = build_dual_encoder(cfg.model, text_dim, cfg.data.image_size)
        if shared:
            seed_everything(expert_seed(tcfg.seed, e))
        model = accelerate_model(model, cfg.hardware)
        module = ExpertModule(
            model,
            lr=tcfg.lr,
            momentum=tcfg.momentum,
            weight_decay=tcfg.weight_decay,
            mean=cfg.data.mean,
            std=cfg.data.std,
            augment=augment,
        )
        recorder = TrajectoryRecorder(module.trainable_names(), heartbeat=(lambda e=e: claims.refresh(e)) if claims else None)
        # What the full-data row of a W&B table needs: which store and expert, and how many images it trained on.
        loggers = build_loggers(cfg, job_type="buffer", name=f"expert_{e:03d}",
                                extra_config={"teacher_run": {"store": str(store.root), "expert": e,
                                                              "train_images": train.num_images}})
        try:
            # The expert's own sample order (its seed) on every rank, each rank its slice of the papers' batch
            # The first expert this process trains says whether the loader bounds the epochs (the others are alike)
            watch = [LoaderWatch(loader_workers(cfg.data.num_workers))] if check_loader else []
            check_loader = False
            trainer = build_trainer(cfg, loggers, [recorder, *watch], max_epochs=tcfg.epochs,
                                    use_distributed_sampler=False)
            loader = global_batch_loader(dataset, tcfg.batch_size, expert_seed(tcfg.seed, e),
                                   loader_options(cfg.data, process_device(cfg.hardware).type == "cuda"))
            started = time.perf_counter()
            trainer.fit(module, loader)
            seconds = time.perf_counter() - started
            if not trainer.is_global_zero:
                continue
            model.to(process_device(cfg.hardware))  # the trainer leaves it on the CPU; val/test on the stage's device
            metrics = {}
            for split in ("val", "test"):
                if split in data:
                    m = evaluate_retrieval(model, data[split], cfg.hardware.inference_batch)
                    metrics[split] = m
            # What this expert cost (read into the cost of every set distilled from it: mmdd table's cost column).
            metrics["cost"] = {"seconds": seconds, "device": device_label(cfg.hardware), "epochs": tcfg.epochs}
            metrics["training"] = training_record(tcfg.batch_size, hardware_processes(cfg.hardware))
            metrics["hardware"] = hardware_record(cfg.hardware)
            # Metrics first: the weights' file is what marks an expert complete, so a crash between the two leaves
            # an incomplete expert (trained again on rerun), never a complete one without metrics.
            atomic_write_json(store.root / f"expert_{e:03d}.metrics.json", metrics)
            store.save_expert(e, recorder.trajectory())
            log_metrics(loggers, {**{f"{s}/{k}": v for s, m in metrics.items() if s in ("val", "test") for k, v in m.items()},
                                  "cost/train_seconds": seconds})
            log.info("expert %d: test r_mean %.2f", e, metrics.get("test", {}).get("r_mean", float("nan")))
            if "test" in metrics and chance_report(data["test"].txt2img, data["test"].num_images,
                                                   [metrics["test"]["r_mean"]])["all_at_chance"]:
                log.warning("expert %d scores at chance on test (r_mean %.2f): it learned nothing, and neither will a "
                            "set distilled from its trajectory; check teacher.lr and the data", e, metrics["test"]["r_mean"])
        finally:
            finish_loggers(loggers)
            if claims is not None:
                claims.release(e)
    if busy:
        log.warning("experts %s were being trained by other processes; rerun `mmdd buffer` (or wait for them) before "
                    "distilling with all %d", busy, tcfg.num_experts)
    return store.root


def run(cfg) -> None:
    store = run_buffer(cfg)
    if is_rank_zero():
        print(f"trajectory store: {store}")
