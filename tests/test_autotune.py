"""target="auto" picks the fastest correct implementation once per shape, with a fake timer.

The candidates are the real ones (the kernels run in the emulator, the PyTorch formulation
on the CPU); only the clock is faked, so the choice, its cache on disk, the rejection of
wrong or failing implementations, the environment overrides and explain() are all checked
without a GPU.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sas_compile.runtime import autotune, emulator
from sas_compile.runtime import matmul
from sas_compile.runtime.packing import pack_sws_weight, unpack_sws_weight
from sas_compile.runtime.projection import project

from test_emulator import one_of_m_weight  # noqa: E402

CPU = torch.device("cpu")


class FakeTimer:
    """Milliseconds by candidate name; records what was timed (and runs it once, as a timer would)."""

    def __init__(self, times):
        self.times, self.timed = dict(times), []

    def __call__(self, name, fn, device_type):
        fn()
        self.timed.append(name)
        return self.times[name]


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    monkeypatch.delenv(autotune.ENV_FORCE, raising=False)
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)

    def make(times, path=None):
        t = autotune.Autotuner(path=path or tmp_path / "autotune.json", timer=FakeTimer(times))
        monkeypatch.setattr(autotune, "_default", t)
        return t

    return make


def candidates(calls=None):
    x = torch.randn(8, 4)

    def make(name, fn):
        def call():
            if calls is not None:
                calls.append(name)
            return fn()
        return call

    return {
        "dense": make("dense", lambda: x * 2),
        "fast": make("fast", lambda: x * 2),
        "wrong": make("wrong", lambda: x * 3),
        "broken": make("broken", lambda: (_ for _ in ()).throw(RuntimeError("no kernel image"))),
    }


def test_fastest_correct_candidate_wins_and_is_remembered(tuner, tmp_path):
    t = tuner({"dense": 2.0, "fast": 1.0, "wrong": 0.1, "broken": 0.1})
    decision = t.choose("op", {"K": 4}, candidates(), CPU)
    assert decision.impl == "fast" and decision.how == "measured"
    assert set(decision.times_ms) == {"dense", "fast"}
    assert "disagrees with the PyTorch formulation" in decision.rejected["wrong"]
    assert "no kernel image" in decision.rejected["broken"]
    timed = list(t._timer.timed)
    calls = []
    assert t.choose("op", {"K": 4}, candidates(calls), CPU).impl == "fast"
    assert t._timer.timed == timed and calls == []  # nothing measured or run again
    # a new process reads the decision from disk
    t2 = tuner({"dense": 1.0, "fast": 5.0}, path=tmp_path / "autotune.json")
    again = t2.choose("op", {"K": 4}, candidates(), CPU)
    assert again.impl == "fast" and again.how == "disk cache" and t2._timer.timed == []
    assert json.loads((tmp_path / "autotune.json").read_text())
    # another shape is measured on its own
    assert t2.choose("op", {"K": 8}, candidates(), CPU).impl == "dense"


def test_environment_forces_or_disables(tuner, monkeypatch):
    t = tuner({"dense": 2.0, "fast": 1.0})
    monkeypatch.setenv(autotune.ENV_FORCE, "wrong")
    forced = t.choose("op", {"K": 1}, candidates(), CPU)
    assert forced.impl == "wrong" and "forced" in forced.how
    monkeypatch.setenv(autotune.ENV_FORCE, "sparse24")
    unusable = t.choose("op", {"K": 1}, candidates(), CPU, rejected={"sparse24": "needs a GPU"})
    assert unusable.impl == "fast" and "needs a GPU" in unusable.rejected["sparse24"]
    monkeypatch.delenv(autotune.ENV_FORCE)
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    off = t.choose("op", {"K": 2}, candidates(), CPU)
    assert off.impl == "dense" and "AUTOTUNE=0" in off.how and t._timer.timed.count("dense") == 1
    assert "forced by SAS_COMPILE_GEMM" in t.explain()


def test_reference_candidate_is_required(tuner):
    with pytest.raises(ValueError, match="must include 'dense'"):
        tuner({}).choose("op", {}, {"fast": lambda: torch.ones(1)}, CPU)


@pytest.mark.parametrize("winner", ["fused", "dense"])
def test_auto_sas_runs_the_chosen_implementation(tuner, winner, monkeypatch):
    if not emulator.available()[0]:
        pytest.skip(emulator.available()[1])
    t = tuner({"dense": 1.0 if winner == "dense" else 3.0, "fused": 2.0})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 24, generator=g).half()
    w = torch.randn(17, 48, generator=g).half()
    b = torch.randn(17, generator=g).half()
    out = matmul._auto_sas(x, w, b, 2, "emulator")
    (decision,) = t.decisions()
    assert decision.impl == winner and decision.op == "sas_linear"
    assert decision.fields["rows"] == 64 and decision.fields["K"] == 24
    assert "sparse24" in decision.rejected  # no CUDA device here
    if winner == "fused":
        assert torch.equal(out, emulator.sas_gemm(x, w, b, 2))
    else:
        assert torch.equal(out, F.linear(project(x, 2), w, b))


def test_auto_sws_checks_the_kernel_against_the_dense_product(tuner):
    if not emulator.available()[0]:
        pytest.skip(emulator.available()[1])
    t = tuner({"dense": 3.0, "kernel": 1.0})
    g = torch.Generator().manual_seed(2)
    dense = one_of_m_weight(20, 32, 2, g).half()
    packed = pack_sws_weight(dense)
    x = torch.randn(9, 32, generator=g).half()
    out = matmul._auto_sws(x, packed, None, "emulator")
    (decision,) = t.decisions()
    assert decision.impl == "kernel" and set(decision.times_ms) == {"dense", "kernel"}
    torch.testing.assert_close(out.float(), (x.float() @ unpack_sws_weight(packed).float().t()), rtol=1e-2, atol=1e-2)


def test_explain_before_any_decision(tuner):
    assert "no decision" in tuner({}).explain()
