"""`mmdd buffer`: train the teachers and record their trajectories in a store."""


def run(cfg) -> None:
    from mmdd.teachers.buffer import run_buffer
    from mmdd.utils.trainer import is_rank_zero

    store = run_buffer(cfg)
    if is_rank_zero():
        print(f"trajectory store: {store}")
