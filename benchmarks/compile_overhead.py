"""The compiler's own cost: capture time and steady calls of ``backend="sas"`` against the same
inner compiler, on ResNet-50, ViT-B/16 and BERT-base (``transformers`` default configs, random
weights, no download).

For each model and inner compiler (eager, aot_eager, inductor), measured in one process:

- capture s (median (min-max) of ``--capture-repeats``, inductor's on-disk caches off, garbage
  collection paused): the first call of ``torch.compile(model, backend=inner)`` (dense) and of
  ``torch.compile(model, backend="sas", options={"inner": inner})`` on the same dense model,
  and the overhead of the second over the first; "compile overhead" is the same with a steady
  call of each side taken off its first call (the first call also runs the model once, which for
  the SAS side is M times the dense multiplies on a CPU);
- steady ms: median (min-max) of later calls of both, and of the model ``sasify``-ed once and
  compiled with the same inner compiler: ``backend="sas"`` on a dense model should cost what
  the sasified model costs (its wide weights are expanded once per weight version, not per call).

And the static analysis: ``sas_compile.report(model, x)`` at its default M = (2, 4, 8) against one
``sasify(model, M)``, median (min-max) of ``--capture-repeats`` (garbage collection paused too).

All under ``torch.no_grad()`` (inference). Run:
    python benchmarks/compile_overhead.py [--models resnet50 vit bert] [--inner eager aot_eager inductor]
    python benchmarks/compile_overhead.py --quick     # tiny configs, to check the script
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Dict, List

import torch
from tabulate import tabulate

import sas_compile


def build(name: str, quick: bool):
    import transformers

    torch.manual_seed(0)
    if name == "resnet50":
        cfg = transformers.ResNetConfig() if not quick else transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck")
        size = 224 if not quick else 32
        return transformers.ResNetModel(cfg).eval(), (torch.randn(1, 3, size, size),)
    if name == "vit":
        cfg = transformers.ViTConfig() if not quick else transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64)
        return transformers.ViTModel(cfg, add_pooling_layer=False).eval(), (torch.randn(1, 3, cfg.image_size,
                                                                                         cfg.image_size),)
    if name == "bert":
        cfg = transformers.BertConfig() if not quick else transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        seq = 128 if not quick else 16
        return transformers.BertModel(cfg, add_pooling_layer=False).eval(), (torch.randint(0, cfg.vocab_size, (1, seq)),)
    raise ValueError(f"unknown model {name!r}")


def timed(fn) -> float:
    """Seconds of ``fn()`` with Python's garbage collector paused (as ``timeit`` does): a full
    collection, 0.04-0.4 s with a transformers model and dynamo's objects alive, falls into one
    capture or another by chance and was the largest part of the spread between identical
    captures; it runs before and after, outside the timing."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    finally:
        gc.enable()


def first_call(compiled, inputs) -> float:
    return timed(lambda: compiled(*inputs))


def steady(fns: Dict[str, object], inputs, repeats: int) -> Dict[str, List[float]]:
    samples = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved: every variant sees the same machine state
        for k, fn in fns.items():
            started = time.perf_counter()
            fn(*inputs)
            samples[k].append((time.perf_counter() - started) * 1e3)
    return samples


def _percent(v: List[float]) -> str:
    return f"{statistics.median(v):+.0f}% ({min(v):+.0f}..{max(v):+.0f})"


def spread(v: List[float], digits: int = 1) -> str:
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit", "bert"], choices=["resnet50", "vit", "bert"])
    parser.add_argument("--inner", nargs="+", default=["eager", "aot_eager", "inductor"],
                        choices=["eager", "aot_eager", "inductor"])
    parser.add_argument("--M", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--capture-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    # every capture compiles from scratch: inductor's on-disk caches would let whichever graph
    # was compiled in an earlier run skip its compile
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = False
    inductor_config.autotune_local_cache = False
    torch._functorch.config.enable_autograd_cache = False
    rows, report_rows = [], []
    for name in args.models:
        model, inputs = build(name, args.quick)
        sas = sas_compile.sasify(model, M=args.M, example_inputs=inputs)
        # the static analysis against one conversion: report at its default M = (2, 4, 8)
        t_sasify, t_report = [], []
        for _ in range(args.capture_repeats):
            t_sasify.append(timed(lambda: sas_compile.sasify(model, M=args.M, example_inputs=inputs)))
            t_report.append(timed(lambda: sas_compile.report(model, inputs)))
        ratio = [b / a for a, b in zip(t_sasify, t_report)]
        report_rows.append([name, spread(t_sasify, 2), spread(t_report, 2), spread(ratio, 2)])
        for inner in args.inner:
            with torch.no_grad():
                # one throwaway compile: one-time imports and initialisation count for neither side
                torch._dynamo.reset()
                torch.compile(model, backend=inner)(*inputs)
                t_dense, t_sas = [], []
                for _ in range(args.capture_repeats):  # interleaved, like the steady calls
                    torch._dynamo.reset()
                    t_dense.append(first_call(torch.compile(model, backend=inner), inputs))
                    torch._dynamo.reset()
                    t_sas.append(first_call(torch.compile(model, backend="sas",
                                                          options={"M": args.M, "inner": inner}), inputs))
                # steady calls: the three compiled side by side (one cache entry each), warmed twice
                torch._dynamo.reset()
                fns = {"dense": torch.compile(model, backend=inner),
                       "sas": torch.compile(model, backend="sas", options={"M": args.M, "inner": inner}),
                       "sasified": torch.compile(sas, backend=inner)}
                for fn in fns.values():
                    fn(*inputs)
                    fn(*inputs)
                times = steady(fns, inputs, args.repeats)
            ratio = [a / b for a, b in zip(times["sas"], times["sasified"])]
            overhead = [100 * (b / a - 1) for a, b in zip(t_dense, t_sas)]
            # the compile alone: each first call less a steady call of the same side (the first
            # call also runs the model, and the SAS model's forward is M times the dense multiplies)
            run_dense, run_sas = (statistics.median(times[k]) / 1e3 for k in ("dense", "sas"))
            compile_only = [100 * ((b - run_sas) / (a - run_dense) - 1) for a, b in zip(t_dense, t_sas)]
            rows.append([name, inner, spread(t_dense, 2), spread(t_sas, 2), _percent(overhead), _percent(compile_only),
                         spread(times["dense"]), spread(times["sas"]), spread(times["sasified"]),
                         f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})"])
            print(f"  {name} {inner} done", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, M={args.M}, batch 1, inductor caches off; "
          f"capture s as median (min-max) of {args.capture_repeats}, steady ms of {args.repeats} interleaved calls")
    print(tabulate(rows, headers=["model", "inner", "capture dense s", "capture sas s", "capture overhead",
                                  "compile overhead", "steady dense ms", "steady backend=sas ms", "steady sasified ms",
                                  "backend=sas / sasified"], tablefmt="github"))
    print()
    print(tabulate(report_rows, headers=["model", f"sasify(M={args.M}) s", "report (M=2,4,8) s", "report / sasify"],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
