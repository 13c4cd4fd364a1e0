"""Peak memory of the conversion itself: ``sasify`` on ResNet-50, ViT-B/16 and BERT-base.

Each (model, M, copy) runs in a fresh child process (peak resident memory is per process). The
child loads the library and converts a tiny model first (the code every variant loads), builds the
model (``sas_compile.models.resnet50``, ImageNet stem; ``transformers`` ViT-B/16 and BERT-base
from their default configs; random weights, no download), then resets the peak and converts it:
the analysis (``analyze_model``, as ``sasify`` runs it) and ``apply_sas_plan`` building the SAS
model, with

- ``copy``: the model copy the SAS model is built in, as ``sasify`` makes it (the default: the
  dense weights the rewrite replaces are not copied), or a full ``deepcopy`` (``full``: what
  ``sasify`` did before, the converted layers' dense weights copied and then dropped).

It reports the dense and SAS parameters, the resident memory before the conversion and the peak
during it (``VmHWM``), and the peak's growth against the SAS parameters: the SAS model itself is
new memory (its wide weights, and a copy of every other tensor), so 1.0 is the floor. The child's
allocator maps every block of 64 KiB or more on its own and unmaps it when freed
(``GLIBC_TUNABLES``), so resident memory follows the live tensors.

Run:
    python benchmarks/sasify_memory.py                 # resnet50 vit bert, M = 2 4
    python benchmarks/sasify_memory.py --models resnet50 --M 2
    python benchmarks/sasify_memory.py --quick         # tiny configs, to check the script
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from typing import Dict, List, Optional

MB = 1 << 20
COPIES = ("sasify", "full")


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", pathlib.Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(name: str, quick: bool):
    """``(model, example inputs or None)``."""
    if name == "resnet50":
        from sas_compile.models import resnet50

        return resnet50(num_classes=10 if quick else 1000, width=8 if quick else 64, cifar=quick).eval(), None
    return _sibling("compile_overhead").build(name, quick)


def child(name: str, M: int, copy: str, quick: bool) -> Dict[str, object]:
    import torch

    import sas_compile
    from sas_compile.passes.pipeline import analyze_model
    from sas_compile.sas import SASConfig, apply_sas_plan

    memory = _sibling("train_memory")
    torch.manual_seed(0)
    sas_compile.sasify(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    model, inputs = build(name, quick)
    config = SASConfig(M=M)
    gc.collect()
    before = memory._resident()
    memory._reset_peak()
    plan = analyze_model(model, inputs, config)
    sas = apply_sas_plan(plan, config, copy_dense_weights=copy == "full")
    peak = memory._peak()
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    return {"model": name, "M": M, "copy": copy, "dense": size(model), "sas": size(sas), "before": before,
            "peak": peak, "converted": len(plan.eligible())}


def run_child(name: str, M: int, copy: str, quick: bool) -> Dict[str, object]:
    cmd = [sys.executable, __file__, "--child", name, "--M", str(M), "--copy", copy] + (["--quick"] if quick else [])
    env = dict(os.environ, GLIBC_TUNABLES=_sibling("train_memory").EXACT_MEMORY)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} M={M} copy={copy} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: List[Dict[str, object]]) -> str:
    from tabulate import tabulate

    rows = []
    for r in results:
        growth = r["peak"] - r["before"]
        rows.append([r["model"], r["M"], r["copy"], r["converted"], f"{r['dense'] / MB:.1f}", f"{r['sas'] / MB:.1f}",
                     f"{r['before'] / MB:.0f}", f"{r['peak'] / MB:.0f}", f"{growth / MB:.0f}",
                     f"{growth / r['sas']:.2f}"])
    headers = ["model", "M", "copy", "layers converted", "dense params MB", "SAS params MB", "before MB", "peak MB",
               "peak growth MB", "growth / SAS params"]
    return tabulate(rows, headers=headers, tablefmt="github")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit", "bert"])
    parser.add_argument("--M", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--quick", action="store_true", help="tiny configs, to check the script")
    parser.add_argument("--copy", choices=COPIES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.M[0], args.copy, args.quick)))
        return 0
    import torch

    results = [run_child(name, M, copy, args.quick) for name in args.models for M in args.M for copy in COPIES]
    print(f"sasify's peak memory{' (quick)' if args.quick else ''}, torch {torch.__version__}; each row in its own "
          "process, allocator with exact accounting; copy: sasify's (replaced dense weights not copied) or full")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
