"""Every shell command in README.md and docs/ runs (#18).

Each ```bash block is one of three kinds, named by a comment on the line before it (see CONTRIBUTING.md):

* no comment: a cheap block. Its commands run here, in a temporary directory that holds what the pages assume
  (a checkpoint of the digits example at the path the pages use: one epoch on a slice of the data). Only
  ``lightning-influence`` commands may be cheap: they run in this process through the console script's
  ``main``, so the test pays no interpreter or ``import lightning`` start-up per command.
* ``<!-- command: long (why) -->``: installs, the full example, benchmarks, the test suite. They run only in
  the ``docs_long`` job (``python -m pytest -m docs_long tests/integration/test_docs_commands.py``), every block
  of a page in order, in the repository root as a new user would run them.
* ``<!-- command: server (why) -->``: a server that runs until stopped (TensorBoard); the ``docs_long`` job
  starts it and passes when it is still serving after a few seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.cli import main

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = r"<!-- command: (?P<kind>long|server) \((?P<why>[^)]*(?:\([^)]*\)[^)]*)*)\) -->\n"
BLOCK = re.compile(rf"(?:{MARK})?```bash\n(?P<code>.*?)```", re.S)
UNTYPED = re.compile(r"^```\n(?P<code>.*?)^```", re.S | re.M)
SHELL_WORDS = ("python", "lightning-influence", "bash", "tensorboard", "pip", "OMP_NUM_THREADS")
CHEAP_SECONDS = 120  # per cheap block, a hang guard (the cheap blocks take seconds)
LONG_SECONDS = 3600  # per long block
SERVER_SECONDS = 15  # a server block passes when it is still running after this long
SMALL_TRAIN, SMALL_VAL = 256, 64  # the cheap blocks' slice of the digits data


def _blocks() -> list[tuple[str, str, str, str | None]]:
    """``(where, kind, code, why)`` for every bash block; kind is ``cheap``, ``long`` or ``server``."""
    found = []
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            where = f"{page.relative_to(ROOT)}#{number}"
            found.append((where, match.group("kind") or "cheap", match.group("code"), match.group("why")))
    return found


BLOCKS = _blocks()
CHEAP = [block for block in BLOCKS if block[1] == "cheap"]


def commands(code: str) -> list[list[str]]:
    """The commands of a block: continuation lines joined, comments dropped, one argv per line."""
    joined = code.replace("\\\n", " ")
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def test_every_block_is_found_and_every_mark_says_why():
    assert len(BLOCKS) >= 10 and len(CHEAP) >= 3
    for where, kind, code, why in BLOCKS:
        assert commands(code), f"{where}: an empty bash block"
        assert kind == "cheap" or (why and why.strip()), f"{where}: say why the block is {kind}"


def test_shell_commands_are_in_bash_blocks():
    """A command in an unlabelled block would escape these tests: label it ```bash."""
    for page in PAGES:
        for match in UNTYPED.finditer(page.read_text(encoding="utf-8")):
            first = match.group("code").lstrip().split(maxsplit=1)[:1]
            assert not first or not first[0].startswith(SHELL_WORDS), (
                f"{page.relative_to(ROOT)}: a shell command in an unlabelled block: mark it ```bash"
            )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[Path]:
    """A directory as the pages assume it: the digits example's checkpoint at the pages' paths.

    The example's own classes and import paths, on a slice of its data (``SMALL_TRAIN`` training and
    ``SMALL_VAL`` validation digits, one epoch): the commands, their flags and their outputs are what this
    checks; the full run's cost is the ``docs_long`` job's and ``benchmarks/digits_walltime.py``'s.
    """
    sys.path.insert(0, str(ROOT))  # `examples.digits:DigitsCNN` resolves from the repository root
    for name in [name for name in sys.modules if name.split(".")[0] == "examples"]:
        if not str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(ROOT)):
            del sys.modules[name]  # another distribution's top-level `examples` (kronfluence ships one)
    from examples import digits

    full_loaders = digits.digits_loaders

    def small_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        train, val = (loader.dataset.tensors for loader in full_loaders(batch_size, seed))
        return (DataLoader(TensorDataset(*(t[:SMALL_TRAIN] for t in train)), batch_size=batch_size, shuffle=True),
                DataLoader(TensorDataset(*(t[:SMALL_VAL] for t in val)), batch_size=256))

    directory = tmp_path_factory.mktemp("docs-world")
    paths = {arg for _, _, code, _ in CHEAP for argv in commands(code) for arg in argv if arg.endswith(".ckpt")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digits, "digits_loaders", small_loaders)
        pl.seed_everything(0)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(digits.DigitsCNN(), datamodule=digits.DigitsDataModule())
        for path in sorted(paths):
            (directory / path).parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(directory / path)
        yield directory
    sys.path.remove(str(ROOT))


def _alarm(signum, frame):
    raise TimeoutError(f"a documented command ran over {CHEAP_SECONDS} s")


@pytest.mark.parametrize(("where", "kind", "code", "why"), CHEAP, ids=[block[0] for block in CHEAP])
def test_cheap_block_runs(where, kind, code, why, world, monkeypatch):
    monkeypatch.chdir(world)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CHEAP_SECONDS)
    try:
        for argv in commands(code):
            assert argv[0] == "lightning-influence", (
                f"{where}: only lightning-influence commands run in the default tests; mark `{argv[0]}` "
                "<!-- command: long (why) --> (CONTRIBUTING.md)"
            )
            assert not {"&&", ";", "|"} & set(argv), f"{where}: one command per line in a cheap block"
            assert main(argv[1:]) == 0, f"{where}: `{shlex.join(argv)}` failed"
            for flag, value in zip(argv, argv[1:]):
                if flag in ("--table", "--pif-json", "--save-checkpoint"):
                    assert (world / value).is_file(), f"{where}: {flag} {value} wrote nothing"
        stray = sorted(p.name for p in world.iterdir() if p.name != "runs")
        assert not stray, f"{where}: a documented command left {stray} in the directory it runs from: write under runs/"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


LONG_PAGES = sorted({block[0].split("#")[0] for block in BLOCKS if block[1] != "cheap"})
RAN: set[str] = set()  # a block repeated on several pages (the install line) runs once per job


@pytest.mark.docs_long
@pytest.mark.parametrize("page", LONG_PAGES)
def test_page_commands_run_in_order(page, request):
    """Every bash block of ``page`` in order, in the repository root, as a new user runs them (slow)."""
    if "docs_long" not in (request.config.option.markexpr or ""):
        pytest.skip("runs only with -m docs_long (installs, full example, benchmarks: a job of its own)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for where, kind, code, _ in (block for block in BLOCKS if block[0].startswith(f"{page}#")):
        if code in RAN:
            continue
        RAN.add(code)
        script = f"set -euo pipefail\n{code}"
        if kind != "server":
            done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, timeout=LONG_SECONDS)
            assert done.returncode == 0, f"{where} exited {done.returncode}"
            continue
        assert shutil.which(commands(code)[0][0]), f"{where}: {commands(code)[0][0]} is not installed"
        server = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, start_new_session=True)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                server.wait(timeout=SERVER_SECONDS)  # still serving: it did not exit with an error
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
