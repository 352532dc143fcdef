"""`mmdd run`: the quick start, every stage on the embedded dataset and a table."""


def run(cfg) -> float | None:
    from mmdd.pipeline import run_all

    return run_all(cfg)["objective"]
