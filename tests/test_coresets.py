import torch

from mmdd.methods.selection.coresets import ForgettingTracker, herding_select, kcenter_select


def test_kcenter_picks_the_farthest_points():
    # a tight cluster at the origin and three outliers at increasing distance
    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 0.0], [0.0, 7.0], [-9.0, 0.0]])
    assert kcenter_select(feats, 4, first=0) == [0, 5, 4, 3]
    assert kcenter_select(feats, 2, first=5) == [5, 3]  # (5, 0) is 14 away from (-9, 0); (0, 7) only 11.4


def test_herding_tracks_the_mean():
    # mean is (0, 0): the first pick is the point nearest the mean, then the pair that cancels
    feats = torch.tensor([[0.1, 0.0], [4.0, 0.0], [-4.0, 0.0], [3.0, 3.0], [-3.1, -3.0]])
    chosen = herding_select(feats, 3)
    assert chosen[0] == 0
    assert set(chosen[1:]) == {1, 2}  # together they keep the running mean at the data mean
    assert len(set(herding_select(feats, 5))) == 5  # never picks twice


def batch_logits(correct: list[bool]) -> torch.Tensor:
    """Logits of a batch in which pair i wins its row and its column exactly when correct[i]."""
    n = len(correct)
    logits = torch.zeros(n, n)
    for i, c in enumerate(correct):
        if c:
            logits[i, i] = 10.0
        else:
            logits[i, (i + 1) % n] = 5.0  # row i prefers the next caption; that column still goes to its own
    return logits


def test_forgetting_counts_learned_to_unlearned_transitions():
    """Drives the callback the coreset trains with: its model's logits (here: the texts, passed through) decide
    which pairs are learned at each presentation."""
    from types import SimpleNamespace

    t = ForgettingTracker(3)
    module = SimpleNamespace(mean=[0.0] * 3, std=[1.0] * 3, model=lambda images, texts: texts)
    idx = torch.tensor([0, 1, 2])
    for correct in ([True, False, True], [False, False, True], [True, False, False], [False, False, False]):
        t.on_train_batch_end(None, module, None, (torch.zeros(3, 3, 2, 2), batch_logits(correct), idx), 0)
    s = t.scores()
    assert s[0] == 2 and s[2] == 1 and s[1] == float("inf")
    # presented in another order, the counts follow the images, not the batch positions
    t = ForgettingTracker(3)
    for correct in ([True, True, False], [False, True, False]):
        t.on_train_batch_end(None, module, None, (torch.zeros(3, 3, 2, 2), batch_logits(correct), idx.flip(0)), 0)
    assert t.scores().tolist() == [float("inf"), 0.0, 1.0]
