"""Every Python snippet in README.md and docs/ runs (or compiles, when marked `<!-- snippet: no-run (why) -->`).

Snippets run in a namespace that holds what their prose assumes: a small trained model on digits, its loss, the
training data and a test batch, so a renamed function or argument fails here instead of in a user's session.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import LogisticRegression, cross_entropy_per_example, digits, loader
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- snippet: no-run \((?P<why>[^)]*(?:\([^)]*\)[^)]*)*)\) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _snippets() -> list[tuple[str, str, str | None]]:
    found = []
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            found.append((f"{page.relative_to(ROOT)}#{number}", match.group("code"), match.group("why")))
    return found


SNIPPETS = _snippets()


@pytest.fixture(scope="module")
def namespace() -> dict:
    """What the snippets' prose assumes: a logistic regression on 120 digits, fitted for a few steps."""
    torch.manual_seed(0)
    x, y = digits()
    model = LogisticRegression().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        cross_entropy_per_example(model, (x[:120], y[:120])).mean().backward()
        optimizer.step()
    train_set = TensorDataset(x[:120], y[:120])

    def train_one_epoch(m: torch.nn.Module) -> None:
        step = torch.optim.SGD(m.parameters(), lr=0.1)
        step.zero_grad()
        cross_entropy_per_example(m, (x[:120], y[:120])).mean().backward()
        step.step()

    return {"torch": torch, "F": F, "model": model, "per_example_loss": cross_entropy_per_example,
            "loss_fn": cross_entropy_per_example, "train_loader": loader(x[:120], y[:120], 64),
            "train_dataset": train_set, "train_set": train_set, "test_batch": (x[1500:1502], y[1500:1502]),
            "x_test": x[1500:1510], "y_test": y[1500:1510], "i": 0, "train_one_epoch": train_one_epoch}


def test_the_pages_have_snippets():
    assert len(SNIPPETS) >= 10


@pytest.mark.parametrize(("where", "code", "why"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_snippet_runs(where, code, why, namespace):
    tree = ast.parse(code, filename=where)  # every snippet is valid Python
    if why is not None:
        assert why.strip(), f"{where}: say why the snippet does not run"
        return
    exec(compile(tree, where, "exec"), dict(namespace))  # noqa: S102 - the documentation's own code
