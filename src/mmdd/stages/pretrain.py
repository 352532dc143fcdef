"""`mmdd pretrain`: contrastive pre-training of the image backbone (for frozen-backbone methods)."""


def run(cfg) -> None:
    from mmdd.teachers.pretrain import run_pretrain

    print(f"pretrained backbone: {run_pretrain(cfg)}")
