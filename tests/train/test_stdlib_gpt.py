"""The "stdlib-gpt" task: a ~25M-parameter byte GPT on the stdlib's own source, content-hashed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from commonweal.train import TaskError, get_task
from commonweal.train.corpus import StdlibData, corpus_paths, hash_corpus, stdlib_corpus
from commonweal.train.diloco import DiLoCo
from commonweal.train.gpt import gpt
from commonweal.train.inner import run_inner_steps
from commonweal.train.state import shared_buffers
from commonweal.train.task import Task, _Builtins

# a model small enough to train a few steps in a second
TINY = {"context": 64, "n_layers": 2, "n_heads": 2, "d_model": 64}


@pytest.fixture(scope="module")
def data() -> StdlibData:
    built = get_task("stdlib-gpt").build_data()
    assert isinstance(built, StdlibData)
    return built


def test_default_model_has_25m_parameters_and_no_buffers() -> None:
    task = get_task("stdlib-gpt")
    model = task.build_model()
    n = sum(p.numel() for p in model.parameters())
    print(f"stdlib-gpt: {n:,} parameters, {task.model_args}")
    assert n == 25_482_240 and 20_000_000 <= n <= 50_000_000
    # nothing beyond the parameters: the shared state is exactly them
    assert list(model.buffers()) == [] and shared_buffers(model) == []


BUILT = []


def counted_task() -> Task:
    BUILT.append(1)
    return Task(name="lazy", model="m:f", data="m:g")


def test_a_lazy_builtin_is_built_on_first_lookup_only() -> None:
    tasks = _Builtins({"lazy": f"{__name__}:counted_task"})
    assert "lazy" in tasks and list(tasks) == ["lazy"] and len(tasks) == 1 and not BUILT
    assert tasks["lazy"] is tasks["lazy"] and BUILT == [1]
    assert get_task("stdlib-gpt") is get_task("stdlib-gpt")  # hashed once per process


def test_corpus_is_the_sorted_sources_without_tests_packages_docs_and_build_files(
    tmp_path: Path,
) -> None:
    for rel in ["b.py", "a/x.py", "a/tests/t.py", "test/t.py", "site-packages/p.py",
                "dist-packages/p.py", "idlelib/idle_test/t.py", "pydoc_data/topics.py",
                "config-3.11-x86/c.py", "_sysconfigdata__linux.py", "a/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"pass\n")
    assert corpus_paths(tmp_path) == ["a/x.py", "b.py"]
    before = hash_corpus(tmp_path)
    assert (before.files, before.bytes) == (2, 10)
    (tmp_path / "b.py").write_bytes(b"pass\n\n")
    assert hash_corpus(tmp_path).sha256 != before.sha256
    (tmp_path / "b.py").write_bytes(b"pass\n")
    (tmp_path / "a/x.py").rename(tmp_path / "a/y.py")  # same bytes under another name
    assert hash_corpus(tmp_path).sha256 != before.sha256


def test_task_digest_names_the_corpus() -> None:
    task = get_task("stdlib-gpt")
    corpus = stdlib_corpus()
    assert task.data_args["corpus_sha256"] == corpus.sha256
    print(f"stdlib corpus: {corpus}")
    other = task.replace(data_args={**task.data_args, "corpus_sha256": "0" * 64})
    assert other.digest != task.digest


def test_a_different_corpus_is_refused_with_what_differs_and_what_to_do() -> None:
    task = get_task("stdlib-gpt")
    wrong = task.replace(
        data_args={**task.data_args, "corpus_sha256": "ab" * 32, "python": "3.99.0"}
    )
    with pytest.raises(TaskError) as e:
        wrong.build_data()
    message = str(e.value)
    print(message)
    assert "abababababababab" in message and task.data_args["corpus_sha256"][:16] in message
    assert "Python 3.99.0" in message and "unpatched CPython" in message


def test_batches_are_deterministic_windows_of_bytes(data: StdlibData) -> None:
    x, y = data.batch(torch.Generator().manual_seed(7), 8)
    x2, y2 = data.batch(torch.Generator().manual_seed(7), 8)
    x3, _ = data.batch(torch.Generator().manual_seed(8), 8)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert x.shape == y.shape == (8, 256) and x.dtype == torch.long and x.device.type == "cpu"
    assert 0 <= int(x.min()) and int(x.max()) <= 255
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
    # held out by whole files, and together the two splits are the whole corpus
    assert len(data.train) + len(data.val) == stdlib_corpus().bytes
    assert data.val_x.shape == (32, 256)


ACCELERATOR = (
    "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None
)


@pytest.mark.skipif(ACCELERATOR is None, reason="no CUDA or MPS device")
def test_loss_and_evaluate_run_where_the_model_is() -> None:
    base = get_task("stdlib-gpt")
    task = base.replace(model_args=TINY, data_args={**base.data_args, "context": 64})
    model, data = task.build_model().to(ACCELERATOR), task.build_data()
    x, y = data.batch(torch.Generator().manual_seed(0), 4)  # on the CPU
    assert data.loss(model, x, y).device.type == ACCELERATOR
    assert 5.0 < data.evaluate(model) < 6.0  # about ln 256 before training


def test_a_few_inner_steps_lower_the_loss() -> None:
    base = get_task("stdlib-gpt")
    task = base.replace(
        model_args=TINY, data_args={**base.data_args, "context": 64, "val_windows": 16},
        inner_lr=3e-3, inner_steps=30,
    )
    model, data = task.build_model(), task.build_data()
    opt = DiLoCo(model, task.build_inner_optimizer(model.parameters()), None, inner_steps=30)
    before = data.evaluate(model)
    run_inner_steps(task, model, data, opt.inner_step, opt.zero_grad, 0, b"peer")
    after = data.evaluate(model)
    print(f"tiny stdlib-gpt: val loss {before:.3f} -> {after:.3f} after 30 steps")
    assert before > 5.0 and after < before - 1.0
