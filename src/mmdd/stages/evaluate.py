"""`mmdd evaluate`: train students on a synthetic set and print its row."""


def evaluate_and_print(cfg, synthetic=None, data=None) -> float | None:
    from mmdd.evaluate.stage import run_evaluate
    from mmdd.report.table import markdown_table, result_row

    results = run_evaluate(cfg, synthetic, data)
    print(markdown_table([result_row(results)]))
    return results["objective"]


def run(cfg) -> float | None:
    return evaluate_and_print(cfg)
