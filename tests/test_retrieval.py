import pytest
import torch

from mmdd.evaluate.retrieval import retrieval_metrics


def test_hand_computed_case():
    sims = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.3, 0.7, 0.6, 0.5]])
    txt2img = torch.tensor([0, 0, 1, 1])
    m = retrieval_metrics(sims, txt2img)
    # IR ranks: captions 0..3 -> 0, 1, 1, 0 ; TR ranks: image 0 -> 0 (0.9), image 1 -> 1 (0.6 behind 0.7)
    assert m["ir1"] == pytest.approx(50.0)
    assert m["ir5"] == pytest.approx(100.0)
    assert m["tr1"] == pytest.approx(50.0)
    assert m["tr10"] == pytest.approx(100.0)
    assert m["r_mean"] == pytest.approx((50 + 100 + 100 + 50 + 100 + 100) / 6)


def test_ties_count_against_the_query():
    sims = torch.zeros(3, 3)
    m = retrieval_metrics(sims, torch.tensor([0, 1, 2]))
    assert m["ir1"] == 0.0 and m["tr1"] == 0.0  # every gt has 2 others scoring >= it
    assert m["ir5"] == 100.0 and m["tr5"] == 100.0


def test_tr_uses_best_ground_truth_caption():
    # image 0 has captions 0 and 1; caption 1 is ranked first -> TR@1 hit though caption 0 is last
    sims = torch.tensor([[0.0, 1.0, 0.5], [0.2, 0.1, 0.9]])
    m = retrieval_metrics(sims, torch.tensor([0, 0, 1]))
    assert m["tr1"] == 100.0


def _reference(sims, txt2img):
    """BLIP-style loops with argsort (equal to ours when there are no ties)."""
    n_img, n_cap = sims.shape
    img2txt = [[j for j in range(n_cap) if txt2img[j] == i] for i in range(n_img)]
    tr = []
    for i in range(n_img):
        order = torch.argsort(sims[i], descending=True).tolist()
        tr.append(min(order.index(j) for j in img2txt[i]))
    ir = []
    for j in range(n_cap):
        order = torch.argsort(sims[:, j], descending=True).tolist()
        ir.append(order.index(int(txt2img[j])))
    out = {}
    for k in (1, 5, 10):
        out[f"ir{k}"] = 100.0 * sum(r < k for r in ir) / n_cap
    for k in (1, 5, 10):
        out[f"tr{k}"] = 100.0 * sum(r < k for r in tr) / n_img
    out["r_mean"] = sum(out.values()) / 6
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_loops_on_random_matrices(seed):
    g = torch.Generator().manual_seed(seed)
    n_img = 30
    txt2img = torch.arange(n_img).repeat_interleave(5)
    txt2img = txt2img[torch.randperm(len(txt2img), generator=g)]
    sims = torch.randn(n_img, len(txt2img), generator=g)
    sims[txt2img, torch.arange(len(txt2img))] += 1.5  # some signal so recalls are not trivial
    ours = retrieval_metrics(sims, txt2img)
    ref = _reference(sims, txt2img)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v), k


def test_chunking_does_not_change_results():
    from mmdd.evaluate.retrieval import retrieval_ranks

    g = torch.Generator().manual_seed(3)
    txt2img = torch.arange(50).repeat_interleave(5)
    sims = torch.randn(50, 250, generator=g)
    a = retrieval_ranks(sims, txt2img, chunk=7)
    b = retrieval_ranks(sims, txt2img, chunk=10_000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 5]))


def test_chance_level_by_hand():
    """Two images with one caption each: a random order ranks the right one first half of the time, and K >= 2
    always hits. Three images, image 0 with two of four captions: TR@1 hits with 2/4, TR@2 with 1 - C(2,2)/C(4,2) =
    5/6; images 1 and 2 (one caption) 1/4 and 1/2."""
    from mmdd.evaluate.retrieval import chance_metrics

    mean, _ = chance_metrics(torch.tensor([0, 1]), 2)
    assert mean["ir1"] == pytest.approx(50) and mean["tr1"] == pytest.approx(50)
    assert mean["ir5"] == mean["tr10"] == pytest.approx(100)
    assert mean["r_mean"] == pytest.approx((50 + 100 + 100) * 2 / 6)
    mean, _ = chance_metrics(torch.tensor([0, 0, 1, 2]), 3)
    assert mean["tr1"] == pytest.approx(100 * (2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert mean["ir1"] == pytest.approx(100 / 3)


def test_chance_level_matches_random_similarities():
    """The expected metrics of random similarity matrices, and their r_mean's spread within the bound."""
    import statistics

    from mmdd.evaluate.retrieval import chance_metrics

    g = torch.Generator().manual_seed(0)
    n = 20
    txt2img = torch.tensor([i for i in range(n) for _ in range(1 + i % 4)])  # 1-4 captions per image
    mean, sd_bound = chance_metrics(txt2img, n)
    runs = [retrieval_metrics(torch.rand(n, len(txt2img), generator=g), txt2img) for _ in range(1500)]
    for k in mean:  # standard error of the Monte Carlo mean: below 0.4 points here
        assert statistics.fmean(r[k] for r in runs) == pytest.approx(mean[k], abs=1.2), k
    sd = statistics.stdev(r["r_mean"] for r in runs)
    assert sd < sd_bound < 2 * sd


def test_students_at_chance_are_told_apart_from_weak_ones():
    from mmdd.evaluate.retrieval import chance_report

    test = torch.arange(1000).repeat_interleave(5)  # Flickr30K's test split: 1000 images x 5 captions
    at = chance_report(test, 1000, [0.4, 0.6, 0.9])
    assert at["all_at_chance"] and at["r_mean"] == pytest.approx(0.53, abs=0.01)
    weak = chance_report(test, 1000, [1.4, 1.7, 1.4])  # the quick start's random coreset
    assert not weak["all_at_chance"] and weak["at_chance"] == 0


def test_recalls_are_the_reference_codes_exact_percentages():
    """100.0 * hits / queries in double precision and r_mean = (text mean + image mean) / 2, as LoRS's itm_eval: a
    float32 mean made 1 of 3 33.333334 and let rounding order two evaluations whose recalls are the same."""
    sims = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.5, 0.1], [0.3, 0.7, 0.4]])  # image 2 ranks its caption 2nd
    m = retrieval_metrics(sims, torch.tensor([0, 1, 2]))
    assert m["tr1"] == 100.0 * 2 / 3 and m["ir1"] == 100.0 * 1 / 3  # caption 2 prefers image 0
    tr = (m["tr1"] + m["tr5"] + m["tr10"]) / 3
    ir = (m["ir1"] + m["ir5"] + m["ir10"]) / 3
    assert m["r_mean"] == (tr + ir) / 2
    # the same hits in another arrangement give the very same r_mean (no rounding ties broken by float32)
    shuffled = retrieval_metrics(sims.flip(0).flip(1), torch.tensor([0, 1, 2]))
    assert shuffled["r_mean"] == m["r_mean"]
