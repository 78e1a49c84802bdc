"""Time a tiny-model optimizer step on one process and under torchrun, at the same global batch.

    python tests/bench_torchrun.py [--ranks 2] [--steps 16]

One process computes `ranks` micro-batches of 32 per step (--grad-accum ranks) on all the machine's
threads; torchrun's ranks compute one each, on threads / ranks each. Only training is timed (its
stage, from the first step to the last), not loading nor evaluation; a test set of 8 records keeps
evaluation short. The base model is the cached tiny one (built first if it is not there)."""
import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMER = textwrap.dedent('''
    import os, sys, time
    import smolora
    real = smolora.train_stage

    def timed(*args, **kwargs):
        started = time.time()
        real(*args, **kwargs)
        if os.environ.get("RANK", "0") == "0":
            print(f"TRAINING {time.time() - started:.3f}", flush=True)
    smolora.train_stage = timed
    smolora.main(sys.argv[1:])
''')


def seconds(command, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr[-2000:])
    return float(next(line.split()[1] for line in done.stdout.splitlines()
                      if line.startswith("TRAINING")))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    threads = os.cpu_count()
    with tempfile.TemporaryDirectory() as work:
        timer = Path(work) / "timer.py"
        timer.write_text(TIMER)
        flags = ["--tasks", "scienceqa", "--method", "lora", "--max-train",
                 str(32 * args.ranks * args.steps), "--max-test", "8", "--epochs", "1",
                 "--batch-size", "32", "--dropout", "0"]
        one = seconds([sys.executable, str(timer), *flags, "--grad-accum", str(args.ranks),
                       "--out", f"{work}/one"], threads)
        many = seconds([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(args.ranks), str(timer), "--", *flags,
                        "--grad-accum", "1", "--out", f"{work}/many"],
                       max(1, threads // args.ranks))
    print(f"a step of {32 * args.ranks} records, {args.steps} steps: one process on {threads} "
          f"threads {one / args.steps:.3f} s, {args.ranks} ranks {many / args.steps:.3f} s: "
          f"ratio {one / many:.2f}")


if __name__ == "__main__":
    main()
