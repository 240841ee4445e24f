"""bf16 autocast runs (LFM-DR and a plain method), and the out-of-memory guard of the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfm.cli.main import OOM_ADVICE, main
from lfm.config import RunConfig, optim_preset
from lfm.errors import LFMError
from lfm.train.trainer import Trainer


def _cfg(method: str, precision: str, **kw) -> RunConfig:
    return RunConfig(
        method=method,
        optim=optim_preset("cpu-sgd"),
        epochs=2,
        batch_size=50,
        progress=False,
        precision=precision,
        device="cpu",
        **kw,
    )


def test_bf16_lfm_dr_is_finite_and_learns():
    trainer = Trainer(_cfg("lfm", "bf16", method_options={"backend": "exact"}))
    seen: list[torch.dtype] = []
    trainer.method.w2.module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    res = trainer.run()
    assert torch.bfloat16 in seen  # the learners' passes ran under bf16 autocast
    assert res["timing"]["precision"] == "bf16"
    for name, last in res["last"].items():
        assert last["test_acc"] > 0.3, (name, last["test_acc"])  # chance is 0.1 on digits
    for h in res["history"]:
        assert all(np.isfinite(v) for v in h["train"].values())
    b = trainer.method.per_example()["b"]
    assert np.isfinite(b).all() and trainer.method.b.dtype == torch.float32


def test_bf16_plain_method_stays_close_to_fp32():
    accs = {}
    for precision in ("fp32", "bf16"):
        res = Trainer(_cfg("ce", precision, max_steps=20)).run()
        accs[precision] = res["last"]["model"]["test_acc"]
    assert accs["bf16"] > 0.5 and abs(accs["bf16"] - accs["fp32"]) < 0.1


def test_unknown_precision_is_an_error():
    with pytest.raises(LFMError, match="precision"):
        _cfg("ce", "fp8").validate()


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"
            " - out of memory"
        ),
    ],
)
def test_out_of_memory_is_one_line_and_exit_2(monkeypatch, capsys, error):
    import lfm.cli.train

    def boom(cfg):
        raise error

    monkeypatch.setattr(lfm.cli.train, "train", boom)
    assert main(["train", "--dataset", "digits", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lfm: error: {OOM_ADVICE}"
    assert "--batch-size" in err and "--precision bf16" in err and "--encoder" in err


def test_other_runtime_errors_still_raise(monkeypatch):
    import lfm.cli.train

    def boom(cfg):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(lfm.cli.train, "train", boom)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", "--dataset", "digits", "--no-progress"])


@pytest.mark.slow
def test_compiled_plain_method_matches_eager():
    states = []
    for compile_ in (False, True):
        trainer = Trainer(_cfg("ce", "fp32", max_steps=3, compile=compile_))
        trainer.run()
        states.append(trainer.method.model.state_dict())
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, atol=1e-5, rtol=0)
