"""Peak memory and time of a training step on the CPU: dense ResNet-50 against the same model sasified.

Each variant runs in a fresh child process (peak RSS is per process): it builds
``sas_compile.models.resnet50`` (ImageNet stem, random weights), converts it with
``sasify(model, M=m)`` for the SAS rows, makes an SGD optimizer with momentum (one state tensor
per parameter), runs one warm-up step (gradients and optimizer state now exist) and ``--steps``
timed steps on random data, and reports:

- ``state MB``: parameters + gradients + momentum, what any training of that model holds;
- ``before MB``: resident memory once the model and optimizer are built (libraries, parameters);
- ``peak MB``: the peak resident memory during the steps (``VmHWM``, reset after the model is
  built, so sasify's own transient memory is not counted): libraries, model, gradients, optimizer
  state, activations and transients at the step's worst. Measured in a child whose allocator
  maps every block of 64 KiB or more on its own and unmaps it when freed (``GLIBC_TUNABLES``),
  so resident memory follows the live tensors; step times come from a second child with the
  default allocator;
- ``step s``: median (min-max) wall time of a step (forward, backward, SGD update).

Then, per SAS row, the extra peak over dense against the extra state: issue 14's target is an
extra peak no larger than the extra state (a SAS step keeps no wide activation: the backward
recomputes the projection from the saved narrow input). Both ways of clearing gradients between
steps are measured, each against its own dense run: ``zero_grad()`` (PyTorch's default; autograd
hands each new gradient to ``.grad``) and ``zero_grad(set_to_none=False)``, where autograd adds a
freshly computed gradient into the kept one, so the step's peak (in the backward of layer4) also
holds one layer's gradient twice, for a SAS layer a wide one (+9 MB on ResNet-50 at M = 2,
attributed with ``torch.profiler``'s memory timeline).

Run:
    python benchmarks/train_memory.py                  # batch 4, 224x224, M = 2, 3 timed steps
    python benchmarks/train_memory.py --M 2 4 --steps 5 --zero-grad none
    python benchmarks/train_memory.py --quick          # a tiny ResNet-50, to check the script
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

MB = 1 << 20
ZERO_GRAD = {"none": "zero_grad()", "zeros": "zero_grad(set_to_none=False)"}


def child(variant: str, batch: int, size: int, steps: int, quick: bool, zero_grad: str) -> Dict[str, object]:
    """One variant in this process: ``"dense"`` or ``"sas:M"``; ``zero_grad`` ``"none"`` frees the
    gradients between steps (``optimizer.zero_grad()``), ``"zeros"`` keeps them and zero-fills them
    (``zero_grad(set_to_none=False)``)."""
    import torch
    import torch.nn.functional as F

    import sas_compile
    from sas_compile.models import resnet50

    torch.manual_seed(0)
    # the same code loaded in every variant: a tiny model through sasify and one training step
    tiny = sas_compile.sasify(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    tiny(torch.randn(2, 4, requires_grad=True)).sum().backward()
    model = resnet50(num_classes=10 if quick else 1000, width=8 if quick else 64, cifar=quick)
    if variant != "dense":
        model = sas_compile.sasify(model, M=int(variant.split(":")[1]))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 10 if quick else 1000, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=zero_grad == "none")
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    gc.collect()
    resident = _resident()
    _reset_peak()
    step()  # gradients and momentum buffers exist from here on
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    momentum = sum(s["momentum_buffer"].numel() * s["momentum_buffer"].element_size()
                   for s in optimizer.state.values() if s.get("momentum_buffer") is not None)
    return {"variant": variant, "zero_grad": zero_grad, "params": params, "state": 2 * params + momentum,
            "before": resident, "peak": _peak(), "times": times}


def _status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _resident() -> int:
    return _status("VmRSS") or 0


def _reset_peak() -> None:
    """Start the peak (VmHWM) from the current resident set: the steps' peak, not sasify's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak is the whole process's (ru_maxrss)
        pass


def _peak() -> int:
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# glibc serves every block of 64 KiB or more with its own mmap and unmaps it when freed, so
# resident memory follows the live tensors and its peak is theirs (allocator slack and trimming
# heuristics moved the default allocator's peak by +-40 MB between identical runs)
EXACT_MEMORY = "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=0"


def run_child(variant: str, zero_grad: str, args, *, exact_memory: bool) -> Dict[str, object]:
    cmd = [sys.executable, __file__, "--child", variant, "--zero-grad", zero_grad, "--batch", str(args.batch),
           "--size", str(args.size), "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    if exact_memory:
        env["GLIBC_TUNABLES"] = EXACT_MEMORY
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(variant: str, zero_grad: str, args) -> Dict[str, object]:
    """Memory from a child with exact accounting, step times from one with the default allocator
    (the exact child pays a page fault per large allocation)."""
    result = run_child(variant, zero_grad, args, exact_memory=True)
    result["times"] = run_child(variant, zero_grad, args, exact_memory=False)["times"]
    return result


def table(results: List[Dict[str, object]]) -> str:
    from tabulate import tabulate

    dense = {r["zero_grad"]: r for r in results if r["variant"] == "dense"}
    rows = []
    for r in results:
        times = r["times"]
        row = [r["variant"], ZERO_GRAD[r["zero_grad"]], f"{r['params'] / MB:.1f}", f"{r['state'] / MB:.1f}",
               f"{r['before'] / MB:.0f}", f"{r['peak'] / MB:.0f}",
               f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"]
        base = dense[r["zero_grad"]]
        if r is base:
            row += ["", "", "", ""]
        else:
            extra_peak, extra_state = r["peak"] - base["peak"], r["state"] - base["state"]
            row += [f"{extra_peak / MB:.0f}", f"{extra_state / MB:.0f}", f"{extra_peak / extra_state:.2f}",
                    f"{statistics.median(times) / statistics.median(base['times']):.2f}"]
        rows.append(row)
    headers = ["variant", "zero_grad", "params MB", "state MB", "before MB", "peak MB", "step s", "extra peak MB",
               "extra state MB", "extra peak / extra state", "step / dense"]
    return tabulate(rows, headers=headers, tablefmt="github")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--M", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=None, help="default 4 (2 with --quick)")
    parser.add_argument("--size", type=int, default=None, help="image size, default 224 (32 with --quick)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="ResNet-50 at width 8 on 32x32 inputs")
    parser.add_argument("--zero-grad", choices=["none", "zeros", "both"], default="both",
                        help="between steps: free the gradients (optimizer.zero_grad(), PyTorch's default), zero-fill "
                             "them (set_to_none=False), or both, each against its own dense run (default)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 4)
    args.size = args.size or (32 if args.quick else 224)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.size, args.steps, args.quick, args.zero_grad)))
        return 0
    import torch

    modes = ["none", "zeros"] if args.zero_grad == "both" else [args.zero_grad]
    results = [measure(v, mode, args) for mode in modes for v in ["dense"] + [f"sas:{m}" for m in args.M]]
    print(f"ResNet-50{' (quick)' if args.quick else ''}, batch {args.batch}, {args.size}x{args.size}, SGD with "
          f"momentum, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} timed steps per "
          "variant; each variant in its own processes (memory: exact-accounting allocator, time: default)")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
