"""Under torchrun, two gloo processes on the CPU: the run of one process with --grad-accum 2, rank 1
writing nothing; an interrupted two-rank run resumes to the matrix of an uninterrupted one."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import smolora
from conftest import make_micro

ROOT = Path(__file__).resolve().parent.parent
TASKS = "scienceqa,grounding"

# Runs smolora's command line on each rank. On rank 1 every write under the run folder raises, and
# with INTERRUPT_AT=k the k-th training step raises KeyboardInterrupt on every rank, as a Ctrl-C.
DRIVER = textwrap.dedent('''
    import os, sys
    import smolora

    out = os.path.abspath(sys.argv[sys.argv.index("--out") + 1])
    WRITES = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"}


    def refuse_writes(event, args):
        if event == "open":
            path, writing = args[0], args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        elif event in WRITES:
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            if os.path.abspath(os.fsdecode(path)).startswith(out):
                raise RuntimeError(f"rank 1 wrote: {event} {path}")


    if os.environ["RANK"] == "1":
        sys.addaudithook(refuse_writes)
    if "INTERRUPT_AT" in os.environ:
        smolora.CHECKPOINT_SECONDS = 0          # a checkpoint after every step
        real, calls = smolora.train_step, []

        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == int(os.environ["INTERRUPT_AT"]):
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        smolora.train_step = step
    smolora.main(sys.argv[1:])
''')


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """An untrained tiny LLaVA checkpoint, a synthetic data root of two tasks, and the driver."""
    root = make_micro(tmp_path_factory.mktemp("micro"), TASKS.split(","), n_train=8, n_test=6)
    (root / "driver.py").write_text(DRIVER)
    return root


def run_args(micro, out, method, *extra):
    return ["--tasks", TASKS, "--method", method, "--model", str(micro / "model"),
            "--data", str(micro / "data"), "--out", str(out), "--epochs", "2", "--batch-size", "2",
            "--r", "8", "--alpha", "16", "--experts", "4", "--dropout", "0",
            "--cache", str(micro / "cache"), *(extra or ["--grad-accum", "1"])]


def torchrun(micro, args, **env):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(micro / "driver.py"), "--", *args]   # --: or torchrun reads --r as its own
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def outputs(out):
    """The run's matrices, every prediction, and the adapters of each stage."""
    results = json.loads((out / "results.json").read_text())
    predictions = {p.relative_to(out): p.read_text()
                   for p in (out / "predictions").rglob("*.jsonl")}
    adapters = [smolora.safetensors.torch.load_file(out / "adapters" / f"stage{t}.safetensors")
                for t in (1, 2)]
    return (results["matrix"], results["mif"]), predictions, adapters


def test_two_ranks_give_the_run_of_one_process_accumulating_two_micro_batches(micro, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # as each rank: the same matmuls to the last bit
    try:
        smolora.main(run_args(micro, one, "smolora", "--grad-accum", "2"))
    finally:
        torch.set_num_threads(threads)
    done = torchrun(micro, run_args(micro, two, "smolora"))
    assert done.returncode == 0, done.stderr[-3000:]
    (tables, predictions, adapters), (tables2, predictions2, adapters2) = outputs(one), outputs(two)
    assert tables == tables2 and predictions == predictions2
    for a, b in zip(adapters, adapters2):
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])   # it learned
    assert done.stdout.count("smolora done in") == 1          # rank 0 alone speaks


def test_an_interrupted_two_rank_run_resumes_to_the_same_matrix(micro, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = torchrun(micro, run_args(micro, whole, "ewc"))
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = torchrun(micro, run_args(micro, cut, "ewc"), INTERRUPT_AT="3")   # stage 1, step 3
    assert stopped.returncode != 0 and "continue with --resume" in stopped.stderr
    assert (cut / "checkpoint.pt").exists() and not (cut / "adapters").exists()
    resumed = torchrun(micro, run_args(micro, cut, "ewc", "--grad-accum", "1", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outputs(whole)[:2] == outputs(cut)[:2]
