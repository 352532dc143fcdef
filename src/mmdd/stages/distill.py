"""`mmdd distill`: synthesize a set with `method`, then (evaluate=true) train its students."""


def run(cfg) -> float | None:
    from mmdd.methods.stage import run_distill
    from mmdd.utils.trainer import is_rank_zero

    from mmdd.plan import check_distill_fits

    check_distill_fits(cfg)  # on a GPU: a cell that cannot fit stops here, before any data, naming what fits
    data = None
    if cfg.evaluate:
        from mmdd.data.datamodule import load_data

        data = load_data(cfg)  # train for distilling, val/test for the students after
    syn_dir = run_distill(cfg, data)
    if not is_rank_zero():
        return None  # the other processes of a multi-process distillation stop here
    print(f"synthetic set: {syn_dir}")
    if cfg.evaluate:
        from mmdd.stages.evaluate import evaluate_and_print

        return evaluate_and_print(cfg, syn_dir, data)
    return None
