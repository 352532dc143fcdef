"""`mmdd bench` on tiny data: both paths run, their gradients agree, the report is written."""

import json

import pytest

from conftest import TINY, run_mmdd


@pytest.fixture(scope="module")
def heads_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    common = [*TINY, "logger=none", "pretrain.epochs=2"]
    run_mmdd(["pretrain", *common, "hydra.run.dir=outputs/pretrain"], root)
    run_mmdd(["buffer", *common, "model=convnet_heads", "hydra.run.dir=outputs/buffer_heads"], root)
    run_mmdd(["buffer", *common, "hydra.run.dir=outputs/buffer"], root)
    return root, common


@pytest.mark.parametrize("method,model", [("repblend", "convnet_heads"), ("tesla_vl", "convnet_minilm"),
                                          ("mtt_vl", "convnet_minilm"), ("lors", "convnet_minilm")])
def test_bench_paths_agree(heads_root, method, model):
    root, common = heads_root
    out = f"outputs/bench_{method}"
    proc = run_mmdd(["bench", *common, f"model={model}", f"method={method}", "bench.iterations=2", "bench.warmup=1",
                     f"hydra.run.dir={out}"], root)
    assert "| s/iter reference | s/iter mmdd |" in proc.stdout
    res = json.loads((root / out / "bench.json").read_text())
    assert res["grad_max_rel_diff"] < 1e-4  # the same gradients, up to float32 rounding
    assert set(res["grad_rel_diff"]) >= {"images", "texts", "lr_image", "lr_text"}
    assert res["sec_per_iter"]["ours"] > 0 and res["sec_per_iter"]["reference"] > 0
    assert len(res["seconds"]["ours"]) == 2
    assert res["cached_backbone_features"] is (method == "repblend")
    assert (root / out / "bench.md").read_text().startswith("| method |")
