import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)  # 2-core CI box: oversubscribed threads run small ops 10x slower


import pytest  # noqa: E402


@pytest.fixture
def tiny_problem():
    """A small logistic regression on digits: ``(model, loss_fn, train_loader, test_batch)``."""
    from helpers import LogisticRegression, cross_entropy_per_example, digits, loader

    torch.manual_seed(0)
    x, y = digits()
    model = LogisticRegression().double()
    return model, cross_entropy_per_example, loader(x[:100], y[:100]), (x[100:103], y[100:103])
