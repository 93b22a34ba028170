#!/usr/bin/env python
"""Unit costs of the analysis on ``benchmarks/scale.py``'s 1.0M-parameter CNN, in units of its training.

What a whole analysis would take too long to show on a shared 2-core machine, measured per example in a child
process each (process CPU seconds, one thread; the resident high-water mark above the child's state just before):

* ``train``: one training step (Adam, batch 128, train mode): the epoch's cost per example;
* ``gn_product``: one Gauss-Newton product of 8 vectors (the monitored points) over a batch of 128 (eval mode):
  the cost per example of every pass of curvature products over the training set, e.g. the solve's residual
  verdict over the whole set (``InfluenceProblem.residual``);
* ``grads_before``: per-example gradients as the self-influence pass took them before the memory budget
  (64 examples a chunk, ``2**26 // P``; a dict of per-parameter blocks, then a flattened copy);
* ``grads_after``: as now (``per_example_chunk``: 16 examples of a 1M-parameter model; one ``[B, P]`` buffer);
* ``kfac_before`` / ``kfac_after``: the K-FAC preconditioner's statistics of one batch of 128 (the self-check's
  CG builds it), the batch whole as before or in pieces of ``FACTOR_PIECE`` examples as now.

Usage::

    python benchmarks/scale_units.py    # writes benchmarks/scale-units-results.json
    python benchmarks/scale_units.py --measures product32_batched,product32_now \
        --json benchmarks/scale-units-product-results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).with_name("scale-units-results.json")
MEASURES = ("train", "gn_product", "grads_before", "grads_after", "kfac_before", "kfac_after")
#: ``--measures`` of the self-check's cost probe (a product of its 32 check points over one batch of 128):
#: ``product32_batched`` the batched form, which the product's timing could pick before the memory budget;
#: ``product32_now`` the product as it runs now (``GaussNewtonProduct``: looped, the batched form over budget).
PRODUCT_MEASURES = ("product32_batched", "product32_now")
BATCH = 128
VECTORS = 8


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def measure(what: str) -> dict[str, Any]:  # long: one measurement per branch, set up alike
    import scale
    import torch
    import torch.nn.functional as F

    from lightning_influence.core.curvature import make_curvature
    from lightning_influence.core.per_example.engine import PerExampleEngine
    from lightning_influence.core.per_example.losses import FunctionalLoss
    from lightning_influence.core.tensors.memory import per_example_chunk
    from lightning_influence.core.tensors.params import flatten, trainable_parameters

    torch.set_num_threads(1)
    net = scale.make_net("cnn")
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 3, 32, 32, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator)

    def loss_fn(model: Any, batch: Any) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    params = trainable_parameters(net, None, torch.float32)
    p = sum(t.numel() for t in params.values())
    repeats = 3
    if what == "train":
        optimizer = torch.optim.Adam(net.parameters())
        net.train()

        def step(size: int) -> None:
            optimizer.zero_grad()
            loss_fn(net, (x[:size], y[:size])).mean().backward()
            optimizer.step()
        examples = BATCH
    else:
        net.eval()
        loss = FunctionalLoss(net, loss_fn, torch.float32)
        if what.startswith("kfac"):
            from lightning_influence.core.curvature import preconditioner

            if what == "kfac_before":
                preconditioner.FACTOR_PIECE = 10**9

            def step(size: int) -> None:
                with torch.enable_grad():
                    preconditioner.build_preconditioner("kfac", loss, params, [(x[:size], y[:size])])
            examples = BATCH
            repeats = 1
        elif what.startswith("product32"):
            from lightning_influence.core.curvature.products import GaussNewtonProduct

            product = GaussNewtonProduct(loss, params, batched=True if what == "product32_batched" else None)
            vectors = torch.randn(32, p, generator=generator)

            def step(size: int) -> None:
                with torch.enable_grad():
                    product((x[:size], y[:size]), vectors)
            examples = BATCH
            repeats = 1
        elif what == "gn_product":
            product = make_curvature("gauss_newton").product(loss, params, "double_backward")
            vectors = torch.randn(VECTORS, p, generator=generator)

            def step(size: int) -> None:
                with torch.enable_grad():
                    product((x[:size], y[:size]), vectors)
            examples = BATCH
        else:
            engine = PerExampleEngine(loss, params)
            examples = (2**26 // p) if what == "grads_before" else per_example_chunk(p, BATCH)

            def step(size: int) -> None:
                batch = (x[:size], y[:size])
                with torch.enable_grad():
                    if what == "grads_before":
                        flatten(engine.grad_dict(batch), batch_dims=1)
                    else:
                        engine.grads(batch)
    step(2)  # warm-up on two examples: first-call setup (hook checks) out of the timing
    reset_peak()
    base = status_mib("VmRSS")
    start = time.process_time()
    for _ in range(repeats):
        step(examples)
    seconds = (time.process_time() - start) / repeats
    return {"what": what, "params": p, "examples": examples, "seconds": seconds,
            "seconds_per_example": seconds / examples, "extra_peak_mib": status_mib("VmHWM") - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--measures", help="comma-separated measures (e.g. " + ",".join(PRODUCT_MEASURES) + "):"
                        " only these, written to --json without the derived ratios")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    if args.measures:
        only = {}
        for what in args.measures.split(","):
            done = subprocess.run([sys.executable, __file__, "--one", what], capture_output=True, text=True, check=True)
            only[what] = json.loads(done.stdout.splitlines()[-1])
            print(json.dumps(only[what]), flush=True)
        Path(args.json).write_text(json.dumps({"clock": "process CPU seconds, 1 thread", "model": "scale.py cnn",
                                               "batch_size": BATCH, "load_average": os.getloadavg(),
                                               "results": only}, indent=1) + "\n")
        return
    rows = {}
    for what in MEASURES:
        done = subprocess.run([sys.executable, __file__, "--one", what], capture_output=True, text=True, check=True)
        rows[what] = json.loads(done.stdout.splitlines()[-1])
        print(json.dumps(rows[what]), flush=True)
    train = rows["train"]["seconds_per_example"]
    derived = {
        "gn_product_pass_in_epochs": rows["gn_product"]["seconds_per_example"] / train,
        "grads_pass_before_in_epochs": rows["grads_before"]["seconds_per_example"] / train,
        "grads_pass_after_in_epochs": rows["grads_after"]["seconds_per_example"] / train,
        "grads_extra_peak_before_over_training_step": rows["grads_before"]["extra_peak_mib"]
        / rows["train"]["extra_peak_mib"],
        "grads_extra_peak_after_over_training_step": rows["grads_after"]["extra_peak_mib"]
        / rows["train"]["extra_peak_mib"],
        "kfac_extra_peak_before_over_training_step": rows["kfac_before"]["extra_peak_mib"]
        / rows["train"]["extra_peak_mib"],
        "kfac_extra_peak_after_over_training_step": rows["kfac_after"]["extra_peak_mib"]
        / rows["train"]["extra_peak_mib"],
    }
    import torch

    payload = {"clock": "process CPU seconds, 1 thread", "torch": torch.__version__, "load_average": os.getloadavg(),
               "model": "scale.py cnn", "batch_size": BATCH, "vectors": VECTORS, "results": rows, "derived": derived}
    Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(derived))


if __name__ == "__main__":
    main()
