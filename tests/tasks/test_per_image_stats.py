"""Tasks save per-image statistics for the leaderboard's paired bootstrap; summed, they give the reported number."""

import pytest


TASKS_WITH_PER_IMAGE = ["linseg", "cluster"]  # det: not yet (the leaderboard says its columns are untested)


def test_case_list_is_not_empty():
    assert TASKS_WITH_PER_IMAGE


@pytest.mark.parametrize("task", TASKS_WITH_PER_IMAGE)
def test_tasks_save_per_image_confusions_that_sum_to_the_reported_miou(task):
    import torch

    from bench.config import build
    from bench.evaluate import load_eval_data
    from bench.registry import TASKS
    from bench.significance import miou_batch

    data = load_eval_data("synthetic", {"num_train": 16, "num_val": 6})
    torch.manual_seed(0)
    proj = torch.randn(8, 3, 1, 1)

    def feats(x):  # a fixed, crude dense feature: 8 channels on a 12×12 grid
        return torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.conv2d(x, proj), 12)

    cls = TASKS.get(task)
    settings = {"epochs": 2, "drop_at": 1} if task == "linseg" else {"seeds": 2, "iters": 5}
    res = cls(build(cls.config_class, settings, f"tasks.{task}")).evaluate(feats, data, torch.device("cpu"))
    conf = res.per_image["confusion"]
    assert conf.shape[0] == len(data.val)
    seeds = conf if conf.ndim == 4 else conf[:, None]
    assert miou_batch(seeds.sum(0)).mean() == pytest.approx(res.metrics["miou"], abs=1e-6)
