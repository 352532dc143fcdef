"""`mmdd bench`: seconds per distillation iteration and memory, mmdd's path against the reference loop."""


def run(cfg) -> None:
    from mmdd.bench.runner import bench_table, run_bench

    print(bench_table([run_bench(cfg)]))
