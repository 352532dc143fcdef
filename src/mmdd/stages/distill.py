"""`mmdd distill`: synthesize a set with `method`, then (evaluate=true) train its students."""


def run(cfg) -> float | None:
    import time

    from mmdd.methods.stage import run_distill

    started = time.time()
    from mmdd.utils.trainer import is_rank_zero

    from mmdd.plan import check_distill_fits

    check_distill_fits(cfg)  # on a GPU: a cell that cannot fit stops here, before any data, naming what fits
    data = None
    if cfg.evaluate:
        from mmdd.data.datamodule import load_data

        data = load_data(cfg)  # train for distilling, val/test for the students after
    syn_dir = run_distill(cfg, data)
    from mmdd.utils.launch import current

    launch = current()
    if cfg.evaluate and launch.world_size > 1:
        # Every process trains its share of the students on its own device; process 0 gathers and prints them
        from mmdd.evaluate.stage import evaluate_over_ranks
        from mmdd.report.table import markdown_table, result_row

        results = evaluate_over_ranks(cfg, syn_dir, data, launch.global_rank, launch.world_size, since=started)
        if results is None:
            return None
        print(f"synthetic set: {syn_dir}")
        print(markdown_table([result_row(results)]))
        return results["objective"]
    if not is_rank_zero():
        return None  # the other processes of a multi-process distillation stop here
    print(f"synthetic set: {syn_dir}")
    if cfg.evaluate:
        from mmdd.stages.evaluate import evaluate_and_print

        return evaluate_and_print(cfg, syn_dir, data)
    return None
