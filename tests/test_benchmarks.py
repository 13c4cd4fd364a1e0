"""The CPU benchmarks run (tiny configurations): the scripts README's tables come from must not rot.

Not a timing test: nothing here asserts a speed.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compile_overhead_quick(capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    assert load("compile_overhead").main(["--quick", "--models", "resnet50", "--inner", "eager", "--repeats", "2",
                                          "--capture-repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "| resnet50 | eager" in out and "report / sasify" in out
    torch._dynamo.reset()


@pytest.mark.slow
def test_cpu_layers_quick(capsys):
    load("cpu_layers").main(["--quick", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "SAS/wide" in out and "project/copy" in out and "faults wide/SAS" in out and "malloc:" in out
    assert "| linear 64x32->64    | bwd     |" in out


@pytest.mark.slow
def test_cpu_inference_quick(capsys):
    assert load("cpu_inference").main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| resnet18 x1 |   2 |" in out and "| resnet18 x1 |   4 |" in out and "inference_mode/no_grad" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults through getrusage")
def test_cpu_layers_counts_page_faults():
    """The fault column counts the pages a call touches for the first time: a 64 MB block is
    above glibc's largest mmap threshold, so each call maps (and faults in) fresh pages."""
    bench = load("cpu_layers")
    faults = {}
    bench._round_robin({"fresh": lambda: torch.ones(16 << 20), "none": lambda: None}, 3, faults)
    assert len(faults["fresh"]) == 3 and min(faults["fresh"]) > 0 and max(faults["none"]) < min(faults["fresh"])


@pytest.mark.slow
def test_train_memory_quick(capsys):
    bench = load("train_memory")
    assert bench.main(["--quick", "--steps", "1", "--zero-grad", "none"]) == 0
    out = capsys.readouterr().out
    assert "| dense" in out and "| sas:2" in out and "extra peak / extra state" in out and "zero_grad()" in out
    kept = bench.child("sas:2", 2, 32, 1, True, "zeros")  # gradients kept and zero-filled, in this process
    assert kept["zero_grad"] == "zeros" and kept["state"] > 2 * kept["params"] and len(kept["times"]) == 1


@pytest.mark.slow
def test_sasify_memory_quick(capsys):
    bench = load("sasify_memory")
    assert bench.main(["--quick", "--models", "resnet50", "--M", "2"]) == 0
    out = capsys.readouterr().out
    assert "| resnet50 |   2 | sasify |" in out and "| resnet50 |   2 | full   |" in out
    row = bench.child("resnet50", 2, "sasify", True)  # in this process
    assert row["converted"] == 53 and row["sas"] > 1.9 * row["dense"] and row["peak"] >= row["before"]
