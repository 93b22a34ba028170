#!/usr/bin/env python
"""Per-example engine across architectures: scoring cost against one training epoch, peak memory, scoring paths.

For each model (the digits MLP and tanh CNN of benchmarks/scoring.py, a BatchNorm CNN on digits, a tiny BERT
classifier from a config on the generated keyword task of examples/text_classification.py, and the same BERT with
LoRA adapters from ``peft``) it measures, single-threaded, in process CPU seconds (benchmarks/scoring.py's clock):

* one training epoch (AdamW, batch 32 for text and 64 for digits; fastest of 5 after a warm-up epoch);
* ``s_test`` for the 8 test points with the defaults (LiSSA, Gauss-Newton curvature, ``damping="auto"`` floored
  at the training weight decay, as the callback passes it), on the model after those 6 epochs (not converged):
  the test gradients, the damping estimate and the solve with its residual checks, timed once (split into the
  damping estimate, the ``scale="auto"`` estimate, and the recursion with its residual checks); the damping,
  worst residual, ``converged`` and steps it reported;
* (fastest of 5 runs) scoring the whole training set against 8 test vectors with ``InfluenceProblem.scores`` (``scoring="auto"``,
  i.e. the hook engine, chunks of 256), as seconds and as a ratio to the epoch; for the MLP and CNN also the
  former ``auto`` choice (``factored``) for comparison;
* the 8 test points' per-example gradients (``InfluenceProblem.gradients``, hooks) and, where ``vmap`` can trace
  the model, the former ``vmap(grad)`` path;
* peak resident memory of the first scoring pass above the memory before it (Linux high-water mark reset);
* which path each parameter group took (``PerExampleEngine.plan``);
* the whole analysis (``s_test`` + scoring) over one epoch.

Usage::

    python benchmarks/models.py                      # writes benchmarks/models-results.json (a few minutes)
    python benchmarks/models.py --quick --json out.json
    python benchmarks/models.py --table              # the docs table (docs/per-example.md) from the results file
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# the examples by module name: a top-level `examples` package of another project (kronfluence) would shadow them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from scoring import PeakRSS, build_model, clock, digits, set_threads

NUM_VECTORS = 8
#: The training runs' AdamW weight decay: the callback passes it to floor ``damping="auto"``.
WEIGHT_DECAY = 1e-3
#: Timed runs per figure, epochs included (the fastest is reported: other jobs on a shared machine only add time).
REPEATS = 5


def text_data(n: int, seed: int):
    from text_classification import KeywordSequences

    return KeywordSequences(n, seed=seed, flip=0.05)


def tiny_bert(lora: bool):
    import torch
    from text_classification import LENGTH, PAD, VOCAB
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2, pad_token_id=PAD)
    model = BertForSequenceClassification(config)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           modules_to_save=["classifier"]))
    return model


def bn_cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 16, 10))


def digits_loss(model, batch):
    import torch.nn.functional as F

    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def text_loss(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def setup(name: str, quick: bool):
    """``(model, loss_fn, train dataset, test batch, training batch size)``."""
    import torch
    from torch.utils.data import TensorDataset

    if name in ("mlp", "cnn", "bn_cnn"):
        (x, y), (xt, yt) = digits(300 if quick else 1500)
        model = bn_cnn() if name == "bn_cnn" else build_model(name)
        return model, digits_loss, TensorDataset(x, y), (xt[:NUM_VECTORS], yt[:NUM_VECTORS]), 64
    train, test = text_data(256 if quick else 1024, 0), text_data(NUM_VECTORS, 1)
    batch = {k: torch.stack([test[i][k] for i in range(NUM_VECTORS)]) for k in ("input_ids", "attention_mask", "labels")}
    return tiny_bert(lora=name == "lora_bert"), text_loss, train, batch, 32


def epoch_seconds(model, loss_fn, dataset, batch_size: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                  weight_decay=WEIGHT_DECAY)
    times = []
    for _ in range(1 + REPEATS):
        model.train()
        start = clock()
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, batch).mean().backward()
            optimizer.step()
        times.append(clock() - start)
    return min(times[1:])


def vmap_grads(problem, batch):
    """The former path: ``vmap(grad)`` over single examples (no fallback)."""
    from torch.func import grad, vmap

    from lightning_influence.core.tensors.batching import add_batch_dim, batched_in_dims

    def single(p, example):
        return problem.loss(p, add_batch_dim(example))[0]

    return vmap(grad(single), in_dims=(None, batched_in_dims(batch)))(problem.params, batch)


def timed(fn, repeats: int = 1) -> tuple[Any, float]:
    """``fn()``'s result and its fastest time over ``repeats`` runs (others' jobs only ever add time)."""
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        out = fn()
        best = min(best, clock() - start)
    return out, best


def s_test_defaults(model, loss_fn, loader, test_batch) -> dict[str, Any]:
    """``s_test`` of the test batch as the callback computes it by default, timed once (call in analysis mode)."""
    from lightning_influence.config import LissaConfig
    from lightning_influence.core import InfluenceProblem

    problem = InfluenceProblem(model, loss_fn, loader, "auto", LissaConfig(), weight_decay=WEIGHT_DECAY)
    start = clock()
    gradients = problem.gradients(test_batch)
    problem.damping  # noqa: B018 - the spectrum estimate for damping="auto" (cached: the solve reuses it)
    damped = clock()
    _ = problem.solver.scale  # scale="auto": cached property read for its timing (the solve reuses it)
    scaled = clock()
    info = problem.solve(gradients).info
    end = clock()
    return {"s_test_seconds": end - start, "s_test_damping_seconds": damped - start,
            "s_test_scale_seconds": scaled - damped, "s_test_recursion_seconds": end - scaled,
            "curvature": info.curvature, "damping": info.damping,
            "damping_rule": info.damping_rule, "s_test_steps": info.iterations, "residual": info.residual,
            "residual_tol": info.residual_tol, "converged": info.converged, "retries": len(info.retries),
            "curvature_products": "stored Jacobian" if problem.products.stored() is not None else "autograd"}


def run(name: str, quick: bool) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from lightning_influence.config import CGConfig
    from lightning_influence.core import InfluenceProblem
    from lightning_influence.core.tensors.modes import analysis_mode

    model, loss_fn, dataset, test_batch, batch_size = setup(name, quick)
    epoch = epoch_seconds(model, loss_fn, dataset, batch_size)
    loader = DataLoader(dataset, batch_size=256, shuffle=False)
    problem = InfluenceProblem(model, loss_fn, loader, 0.01, CGConfig())
    s = torch.randn(NUM_VECTORS, problem.num_params, generator=torch.Generator().manual_seed(1)) / problem.num_params**0.5
    result: dict[str, Any] = {"model": name, "trainable_params": problem.num_params, "n_train": len(dataset),
                              "epoch_seconds": epoch}
    with analysis_mode(model):
        result.update(s_test_defaults(model, loss_fn, loader, test_batch))
        problem.gradients(test_batch)  # warm-up (and the engine's one-time hook check)
        _, result["test_gradients_seconds"] = timed(lambda: problem.gradients(test_batch), REPEATS)
        try:
            _, result["test_gradients_vmap_seconds"] = timed(lambda: vmap_grads(problem, test_batch), REPEATS)
        except Exception as err:  # noqa: BLE001 - vmap could not trace the model
            result["test_gradients_vmap_seconds"] = None
            result["vmap_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        memory = PeakRSS()  # over the first scoring pass (later ones reuse memory the allocator kept)
        list(problem.scores(s, method="auto"))
        result["scoring_peak_mib"] = round(memory.peak_mib(), 1)
        methods = ("auto", "factored") if name in ("mlp", "cnn") else ("auto",)
        best = {m: float("inf") for m in methods}
        outputs: dict[str, torch.Tensor] = {}
        for _ in range(REPEATS):  # alternate the methods so that load from other jobs hits both alike
            for m in methods:
                outputs[m], seconds = timed(lambda m=m: torch.cat(list(problem.scores(s, method=m)), dim=1))
                best[m] = min(best[m], seconds)
        blocks, reference = outputs["auto"], outputs.get("factored")
        result["scoring_seconds"] = best["auto"]
        result["scoring_over_epoch"] = result["scoring_seconds"] / epoch
        result["analysis_over_epoch"] = (result["s_test_seconds"] + result["scoring_seconds"]) / epoch
        if reference is not None:
            result["scoring_factored_seconds"] = best["factored"]
            result["hooks_vs_factored_rel_diff"] = float((blocks - reference).norm() / reference.norm())
    plan = problem.per_example.plan
    result["paths"] = {path: len(names) for path, names in plan.groups().items()}
    result["generic_method"] = plan.generic_method
    result["plan_note"] = plan.note()
    return result


MODEL_LABELS = {"mlp": "MLP 64-1024-1024-10 (digits)", "cnn": "tanh CNN (digits)", "bn_cnn": "BatchNorm CNN (digits)",
                "bert": "tiny BERT (text)", "lora_bert": "LoRA BERT, r=4 (text)"}


def print_table(payload: dict[str, Any]) -> None:
    """The table of docs/per-example.md, from a results file."""
    def num(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print("| model | trainable params | epoch (s) | scoring, 8 vectors (s) | scoring / epoch | factored (s) |"
          " peak memory (MiB) | 8 test gradients, hooks / vmap (s) | s_test, defaults (s): damping + scale + recursion |"
          " damping (auto) |"
          " worst residual (converged) | whole analysis / epoch | training set for <= 5 epochs | paths |")
    print("|" + "---|" * 14)
    for row in payload["results"]:
        vmap = "raises" if row["test_gradients_vmap_seconds"] is None else num(row["test_gradients_vmap_seconds"])
        paths = ", ".join(f"{path} {count}" for path, count in row["paths"].items())
        converged = "yes" if row["converged"] else "no"
        print(f"| {MODEL_LABELS.get(row['model'], row['model'])} | {row['trainable_params']:,} | {num(row['epoch_seconds'])}"
              f" | {num(row['scoring_seconds'])} | {num(row['scoring_over_epoch'], 2)}"
              f" | {num(row.get('scoring_factored_seconds'))} | {row['scoring_peak_mib']}"
              f" | {num(row['test_gradients_seconds'])} / {vmap} | {num(row['s_test_seconds'], 1)}:"
              f" {num(row['s_test_damping_seconds'], 1)} + {num(row['s_test_scale_seconds'], 1)}"
              f" + {num(row['s_test_recursion_seconds'], 1)} ({row.get('curvature_products', 'autograd')})"
              f" | {row['damping']:.3g} | {row['residual']:.3f} ({converged}, {row['s_test_steps']} steps)"
              f" | {num(row['analysis_over_epoch'], 1)} | {break_even(row):,} | {paths} |")


def break_even(row: dict[str, Any]) -> int:
    """The training-set size from which the whole analysis takes at most 5 epochs: s_test does not grow with the
    training set, while an epoch and the scoring grow linearly (scoring stays ``scoring_over_epoch`` epochs)."""
    per_example_epoch = row["epoch_seconds"] / row["n_train"]
    return math.ceil(row["s_test_seconds"] / (per_example_epoch * (5 - row["scoring_over_epoch"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller training sets (smoke run)")
    parser.add_argument("--json", default=str(Path(__file__).with_name("models-results.json")))
    parser.add_argument("--models", default="mlp,cnn,bn_cnn,bert,lora_bert",
                        help="models to run; a subset replaces those rows in an existing --json file")
    parser.add_argument("--table", action="store_true", help="print the docs table from the --json file")
    parser.add_argument("--derive", action="store_true",
                        help="add the derived columns (break-even training-set size) to an existing --json file")
    args = parser.parse_args()
    if args.derive:
        payload = json.loads(Path(args.json).read_text())
        for row in payload["results"]:
            row["train_size_for_5_epochs"] = break_even(row)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        return
    if args.table:
        print_table(json.loads(Path(args.json).read_text()))
        return
    set_threads(1)
    import torch

    previous = []
    if args.models != parser.get_default("models") and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())["results"]
    results = []
    for name in args.models.split(","):
        start = time.perf_counter()
        load = os.getloadavg()[0]
        row = run(name, args.quick)
        row["wall_seconds_total"] = round(time.perf_counter() - start, 1)
        row["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # 1-min load before / after
        row["train_size_for_5_epochs"] = break_even(row)
        results.append(row)
        print(f"{name:>10}: params {row['trainable_params']:>8}  epoch {row['epoch_seconds']:.3f}s  scoring(8 pts)"
              f" {row['scoring_seconds']:.3f}s = {row['scoring_over_epoch']:.2f} epochs  peak +{row['scoring_peak_mib']} MiB"
              f"  grads(8) hooks {row['test_gradients_seconds']:.3f}s vmap {row['test_gradients_vmap_seconds']}"
              f"  factored {row.get('scoring_factored_seconds')} {row.get('vmap_error', '')}"
              f"\n{'':>12}s_test {row['s_test_seconds']:.1f}s ({row['s_test_steps']} steps, damping {row['damping']:.3g},"
              f" residual {row['residual']:.3f}, converged {row['converged']}); whole analysis"
              f" {row['analysis_over_epoch']:.1f} epochs\n{'':>12}{row['plan_note']}", flush=True)
    ran = {row["model"] for row in results}
    order = parser.get_default("models").split(",")
    merged = sorted([r for r in previous if r["model"] not in ran] + results,
                    key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    payload = {"clock": "process CPU seconds, 1 thread", "torch": torch.__version__, "machine": platform.machine(),
               "quick": args.quick, "num_vectors": NUM_VECTORS,
               "note": "shared 2-core machine: load_average is the 1-minute load before/after each model's run",
               "results": merged}
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
