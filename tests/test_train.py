"""The plain trainer: learns, selects on validation only, resumes exactly, writes its files."""

import json

import numpy as np
import pytest
import torch

from lfm.config import ModelConfig, RunConfig
from lfm.data.config import DataConfig
from lfm.losses import LOSSES, class_balanced_weights, focal_loss
from lfm.train.checkpoint import CheckpointDir, safe_load
from lfm.train.optim import OptimConfig, lr_factor_fn
from lfm.train.trainer import Trainer, train


def small_cfg(tmp_path=None, **kw) -> RunConfig:
    base = dict(
        data=DataConfig(dataset="digits"),
        model=ModelConfig("mlp", {"hidden_sizes": [64]}),
        epochs=4,
        batch_size=50,
        progress=False,
        out=str(tmp_path) if tmp_path else None,
    )
    base.update(kw)
    return RunConfig(**base)


def test_ce_on_digits_learns_far_above_chance(tmp_path):
    res = train(small_cfg(tmp_path, epochs=8))
    assert res["last"]["model"]["test_acc"] > 0.85  # chance is 0.1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "complete" and len(saved["history"]) == 8
    arrays = np.load(tmp_path / "per_example.npz")
    assert len(arrays["label"]) == res["data"]["sizes"]["train"]


def test_selection_uses_validation_not_test(tmp_path):
    res = train(small_cfg(tmp_path, epochs=5))
    hist = res["history"]
    best_val = max(h["val"]["model"] for h in hist)
    sel = res["selected"]["model"]
    assert sel["val_acc"] == best_val
    assert sel["test_acc"] == next(h["test"]["model"] for h in hist if h["epoch"] == sel["epoch"])


@pytest.mark.parametrize("method", ["focal", "cb", "ce-clean", "ce-all"])
def test_other_plain_methods_run(method):
    res = train(small_cfg(method=method, epochs=2, data=DataConfig(imbalance=10, noise="flip:0.2")))
    assert 0.0 <= res["last"]["model"]["test_acc"] <= 1.0


def test_ce_clean_trains_on_the_validation_set_only():
    t = Trainer(small_cfg(method="ce-clean", epochs=1))
    assert len(t.split) == len(t.bundle.val) == 100


def test_killed_run_resumes_to_identical_parameters(tmp_path):
    """Stop after 7 steps (mid-epoch, checkpoints every 3), resume: same weights as straight."""
    full = Trainer(small_cfg(epochs=3, batch_size=100))
    full.run()
    straight = {k: v.clone() for k, v in full.method.model.state_dict().items()}

    cfg = small_cfg(tmp_path, epochs=3, batch_size=100, checkpoint_every=3, max_steps=7)
    Trainer(cfg).run()
    assert CheckpointDir(tmp_path / "checkpoints").paths()
    resumed = Trainer(small_cfg(tmp_path, epochs=3, batch_size=100, checkpoint_every=3))
    res = resumed.run()
    assert res["timing"]["resumed"]
    for k, v in resumed.method.model.state_dict().items():
        torch.testing.assert_close(v, straight[k], rtol=0, atol=0)


def test_resume_refuses_a_different_run(tmp_path):
    Trainer(small_cfg(tmp_path, epochs=1)).run()
    from lfm.errors import LFMError

    with pytest.raises(LFMError, match="different 'seed'"):
        Trainer(small_cfg(tmp_path, epochs=2, seed=5)).run()


def test_checkpoints_keep_the_newest_k(tmp_path):
    d = CheckpointDir(tmp_path, keep=2)
    for step in (1, 2, 3):
        d.save({"w": torch.ones(2) * step}, step)
    assert [p.name for p in d.paths()] == ["ckpt-000000002.pt", "ckpt-000000003.pt"]
    assert d.latest()["w"][0] == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    from lfm.errors import LFMError

    p = tmp_path / "ckpt-000000001.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(LFMError, match="corrupt"):
        safe_load(p)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(focal_loss(logits, y, 0.0), ce)
    assert (focal_loss(logits, y, 2.0) <= ce + 1e-7).all()


def test_class_balanced_weights_favour_rare_classes():
    w = class_balanced_weights([1000, 100, 10], beta=0.999)
    assert w[0] < w[1] < w[2] and abs(w.sum().item() - 3) < 1e-5
    loss = LOSSES.create("cb", [1000, 100, 10], beta=0.999)
    assert loss(torch.zeros(3, 3), torch.tensor([0, 1, 2])).shape == (3,)


def test_step_schedule_and_cosine():
    step = lr_factor_fn(OptimConfig(schedule="step", milestones=(2, 3), gamma=0.1), 10, 40)
    assert [step(s) for s in (0, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = lr_factor_fn(OptimConfig(schedule="cosine"), 10, 40)
    assert cos(0) == 1 and cos(20) == pytest.approx(0.5) and cos(40) == pytest.approx(0)
