"""The benchmark behind the README's Results: one protocol, three seeds, every claim of both papers put to a test.

    python tests/benchmark.py             # run what is missing (resumable at any point), then rewrite the tables
    python tests/benchmark.py --tables    # only rewrite the tables from docs/results/

The protocol (docs/results/README.md states it beside the tables):
1. A learning rate per method, chosen once: each method runs the validation sequence (VALIDATION's three tasks,
   trained on their training records but the last VALIDATION_RECORDS, evaluated on those held-out ones, so no
   test record is ever seen) at every rate of LR_GRID with seed 0; the rate with the best MAP (Multitask: AP) wins.
2. Every row of every experiment runs on SEEDS at its method's rate. The seed moves adapter init, data order and
   dropout; the synthetic data is the same for all (the one made with seed 0).
3. A finished run's results.json is copied at once to docs/results/<experiment>/<row>/seed<k>.json (SMoLoRA's
   routing.md beside it), so an interrupted benchmark loses at most the run under way. The tables are made from
   those files alone: the README's headline table (its `<!-- benchmark:NAME -->` blocks) and docs/results/README.md,
   written whole from RESULTS_PAGE; tests/test_benchmark.py remakes both and fails on any difference.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data   # noqa: E402
import eval   # noqa: E402
import smolora   # noqa: E402

RESULTS = ROOT / "docs" / "results"
RUNS = ROOT / "runs" / "benchmark"
README = ROOT / "README.md"
RESULTS_README = RESULTS / "README.md"   # every table, written whole from docs/results
SEEDS = (0, 1, 2)
LR_GRID = (1e-3, 2e-3, 5e-3)
VALIDATION = ("scienceqa", "textvqa", "imagenet")
VALIDATION_RECORDS = 60
SCALE = ("--max-train", "300", "--max-test", "40")     # records per task: what makes the whole fit in ~2 hours
CONTINUAL = [m for m in smolora.METHODS if m not in ("zeroshot", "multitask", "dirlora")]
UNSEEN = "vizwiz,textcaps,ocrvqa,places365"


def rows(methods, *extra):
    return {m: ("--method", m, *extra) for m in methods}


# experiment -> (the flags of all its rows, {row: the row's own flags}); a row's method is its --method
EXPERIMENTS = {
    "coin": (("--tasks", "coin"), rows(smolora.METHODS)),
    "smolora": (("--tasks", "smolora", "--unseen", UNSEEN),
                {**rows(["zeroshot", "multitask", "dirlora"]), **rows(CONTINUAL, "--fewshot", "places365:5,10")}),
    "diverse": (("--tasks", "smolora", "--unseen", UNSEEN, "--instructions", "diverse"),
                {**rows(["lora", "moelora", "smolora"]),
                 "smolora, task routing": ("--method", "smolora", "--if-routing", "task")}),
    "ablation": (("--tasks", "smolora", "--method", "smolora"),
                 {**{f"{parts}, {routing}": ("--smolora-parts", parts, "--if-routing", routing)
                     for routing in ("sample", "task") for parts in ("vu", "if", "vu,if", "vu,if,fusion")
                     if (parts, routing) != ("vu", "task")},           # without the IF pool, routing it is moot
                  "vu,if,fusion, sample, top-2": ("--top-k", "2")}),
}


# rows trained exactly as a row of another experiment (same method, flags of training, rate and seed; they differ
# only in what is evaluated): they take that run's stage adapters and only evaluate (training is bit-reproducible)
SAME_TRAINING = {"diverse": {"lora": ("smolora", "lora"), "moelora": ("smolora", "moelora"),
                             "smolora": ("smolora", "smolora"),
                             "smolora, task routing": ("ablation", "vu,if,fusion, task")},
                 "ablation": {"vu,if,fusion, sample": ("smolora", "smolora")}}

# whose DirLoRA diagonal an experiment's rows must reach 80% of (the diverse wording is tested, not learned)
LEARNING_REFERENCE = {"coin": "coin", "smolora": "smolora", "ablation": "smolora"}


def slug(row):
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


def method_of(flags):   # a row without --method is smolora.py's default, SMoLoRA (the ablation's rows)
    return flags[flags.index("--method") + 1] if "--method" in flags else "smolora"


# ----------------------------------------------------------------------------------------------
# Running (resumable: a run whose result is saved is never run again)

def validation_root():
    """The validation data: per task, its training records but the last VALIDATION_RECORDS as train.json, and those
    as test.json (in CoIN's test format), with the images where the synthetic data keeps them."""
    synthetic, root = smolora.CACHE / "data-v1", smolora.CACHE / "benchmark-validation"
    data.make_synthetic(synthetic, VALIDATION, seed=0, **smolora.SYNTHETIC)
    for task in VALIDATION:
        records = json.loads((synthetic / task / "train.json").read_text())
        for record in records:
            record["image"] = str(synthetic / record["image"])
        held_out = [{"question_id": r["id"], "image": r["image"], "answer": r["conversations"][1]["value"],
                     "text": r["conversations"][0]["value"].replace("<image>\n", "")}
                    for r in records[-VALIDATION_RECORDS:]]
        (root / task).mkdir(parents=True, exist_ok=True)
        data.write_json(root / task / "train.json", records[:-VALIDATION_RECORDS])
        data.write_json(root / task / "test.json", held_out)
    return root


def run_once(flags, out, saved, trained=None):
    """Run `smolora.py flags` into out (resuming what is there; its output in out/log.txt) on one thread, and keep its
    results.json (and routing.md) in `saved`. `trained`: a run folder whose stage adapters this run would train bit
    for bit; they are copied in, and --resume then only evaluates. Returns the results; a failed run is named."""
    if saved.exists():
        return json.loads(saved.read_text())
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    for stage in sorted(trained.glob("adapters/stage*.safetensors")) if trained else []:
        shutil.copy(stage, out / "adapters" / stage.name)
    command = [sys.executable, str(ROOT / "smolora.py"), *flags, "--out", str(out), "--resume"]
    with open(out / "log.txt", "a") as log:
        failed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if failed:
        print(f"benchmark: FAILED ({failed}): {' '.join(command)}; see {out}/log.txt", flush=True)
        return None
    saved.parent.mkdir(parents=True, exist_ok=True)
    if (out / "routing.md").exists():
        eval.write_atomic(saved.with_name(saved.stem + "-routing.md"), (out / "routing.md").read_text())
    results = portable(json.loads((out / "results.json").read_text()))
    eval.write_atomic(saved, json.dumps(results, indent=2) + "\n")
    print(f"benchmark: {saved.relative_to(ROOT)} in {results['seconds']:.0f} s", flush=True)
    return results


def portable(results):
    """The results with the paths of the machine they ran on made machine-free: the run folder from
    runs/ on, the cache and what is in it under $SMOLORA_CACHE."""
    cache = str(smolora.CACHE)
    for key in ("out", "cache", "data"):
        path = results["config"].get(key) or ""
        if path == cache or path.startswith(cache + "/"):
            results["config"][key] = "$SMOLORA_CACHE" + path[len(cache):]
        elif "/runs/" in path:
            results["config"][key] = path[path.index("/runs/") + 1:]
    return results


def run_parallel(jobs, workers):
    """Each (flags, out, saved, trained) of jobs through run_once, `workers` at a time (one thread each: 2 on 2
    cores)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_once(*job), jobs))


def selection_score(results):
    return results["metrics"]["MAP"] if results["metrics"]["MAP"] is not None else results["metrics"]["AP"]


def rate_jobs(root):
    return [(("--tasks", ",".join(VALIDATION), "--method", method, "--data", str(root), "--lr", f"{lr:g}",
              "--seed", "0", *SCALE), RUNS / "lr" / method / f"lr{lr:g}", RESULTS / "lr" / method / f"lr{lr:g}.json")
            for method in smolora.METHODS if method != "zeroshot" for lr in LR_GRID]   # zeroshot has no rate


def chosen_rates():
    """method -> (its learning rate, {rate: its validation MAP}), for the methods whose grid is complete."""
    rates = {}
    for method in smolora.METHODS:
        saved = [RESULTS / "lr" / method / f"lr{lr:g}.json" for lr in LR_GRID]
        if all(path.exists() for path in saved):
            tried = {lr: selection_score(json.loads(path.read_text())) for lr, path in zip(LR_GRID, saved)}
            rates[method] = (max(tried, key=lambda lr: (tried[lr], -lr)), tried)   # a tie goes to the lower rate
    return rates


def run_all(workers):
    run_parallel(rate_jobs(validation_root()), workers)
    rates, trains, evaluates = chosen_rates(), [], []
    for experiment, (common, table) in EXPERIMENTS.items():
        for row, flags in table.items():
            lr, source = rates.get(method_of(flags)), SAME_TRAINING.get(experiment, {}).get(row)
            (evaluates if source else trains).extend(
                ((*common, *flags, *SCALE, "--seed", str(seed), *(("--lr", f"{lr[0]:g}") if lr else ())),
                 RUNS / experiment / slug(row) / f"seed{seed}", RESULTS / experiment / slug(row) / f"seed{seed}.json",
                 source and RUNS / source[0] / slug(source[1]) / f"seed{seed}") for seed in SEEDS)
    run_parallel(trains, workers)
    run_parallel(evaluates, workers)   # after the runs whose adapters they take


# ----------------------------------------------------------------------------------------------
# The tables: mean ± std over the seeds (the sample standard deviation), from docs/results alone

def seeds_of(experiment, row):
    return [json.loads(p.read_text()) for p in sorted((RESULTS / experiment / slug(row)).glob("seed*.json"))]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def mean_run(runs, name):
    """One results dict whose every number is the mean over the seeds' (None where any is None), named `name`:
    what eval.write_comparison draws for a row."""
    def mean(values):
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], list):
            return [mean(list(column)) for column in zip(*values)]
        numbers = isinstance(values[0], (int, float)) and not isinstance(values[0], bool)
        return (None if None in values else statistics.mean(values)) if numbers else values[0]
    return {**mean(runs), "method": name}


def split_of(results):
    """The mean of each part of the dual-forgetting split over the earlier tasks."""
    parts = list((results.get("dual_forgetting") or {}).values())
    return {k: statistics.mean(p[k] for p in parts) if parts else None for k in eval.SPLIT}


def diagonal(results):
    matrix, stages = results["matrix"], len(results["matrix"]) - 1
    return [matrix[i + 1][i] for i in range(len(results["tasks"]))] if stages == len(results["tasks"]) else None


def table(header, lines):
    return "\n".join([f"| {' | '.join(header)} |", "|---|" + "---:|" * (len(header) - 1), *lines])


def main_table(experiment, rates):
    columns = ("AP", "MFT", "MAP", "BWT", "MIF", "GK")
    header = ("method", "lr", *columns, "format broke, knowledge kept", "format broke, knowledge lost",
              "format held, wrong")
    lines = []
    for row in EXPERIMENTS[experiment][1]:
        runs = seeds_of(experiment, row)
        if not runs:
            continue
        lr = rates.get(method_of(EXPERIMENTS[experiment][1][row]))
        cells = [mean_std([r["metrics"][k] for r in runs]) for k in columns]
        cells += [mean_std([split_of(r)[k] for r in runs]) for k in eval.SPLIT]
        lines.append(f"| {row} | {f'{lr[0]:g}' if lr else '–'} | " + " | ".join(cells) + " |")
    return table(header, lines)


def unseen_table(experiment):
    """Each row's final score on the unseen tasks, then on each few-shot task after k-shot tuning (– where none)."""
    header, lines = (), []
    for row in EXPERIMENTS[experiment][1]:
        runs = seeds_of(experiment, row)
        if not runs or "unseen" not in runs[0]:
            continue
        tasks, shots = runs[0]["unseen"]["tasks"], runs[0].get("fewshot") or {}
        header = max(header, ("method", *tasks, *(f"{t} {k}-shot" for t, ks in shots.items() for k in ks)), key=len)
        cells = [mean_std([r["unseen"]["matrix"][-1][i] for r in runs]) for i in range(len(tasks))]
        cells += [mean_std([r["fewshot"][t][k]["score"] for r in runs]) for t, ks in shots.items() for k in ks]
        lines.append((row, cells))
    return table(header, [f"| {row} | " + " | ".join(cells + ["–"] * (len(header) - 1 - len(cells))) + " |"
                          for row, cells in lines]) if header else ""


def learning_table(rates):
    lines = [f"| {m} | " + " | ".join(f"{tried[lr]:.1f}" for lr in LR_GRID) + f" | {lr:g} |"
             for m, (lr, tried) in rates.items()]
    return table(("method", *(f"MAP at {lr:g}" for lr in LR_GRID), "chosen"), lines)


def mean_diagonals(experiment):
    """{row: its mean score on each task right after learning it}, for the rows that learn one task a stage."""
    found = {}
    for row in EXPERIMENTS[experiment][1]:
        runs = seeds_of(experiment, row)
        if runs and None not in map(diagonal, runs):
            found[row] = [statistics.mean(column) for column in zip(*map(diagonal, runs))]
    return found


def learned_table(experiment, reference):
    """Each row's mean score on each task right after learning it, DirLoRA's of the `reference` experiment (the same
    tasks, the trained wording) first; **bold** where under 80% of DirLoRA's: the task was not learned."""
    rows, theirs = mean_diagonals(experiment), mean_diagonals(reference).get("dirlora")
    if not rows or not theirs:
        return ""
    tasks = seeds_of(reference, "dirlora")[0]["tasks"]
    lines = ["| DirLoRA, the reference | " + " | ".join(f"{v:.1f}" for v in theirs) + " |"]
    lines += [f"| {row} | " + " | ".join(f"**{v:.1f}**" if v < 0.8 * best else f"{v:.1f}"
                                         for v, best in zip(mine, theirs)) + " |"
              for row, mine in rows.items() if not (row == "dirlora" and experiment == reference)]
    return table(("right after learning", *tasks), lines)


def routing_tables(path):
    """A routing.md below its title: its note wrapped to 110 characters, its headings one level down."""
    if not path.exists():
        return ""
    lines = path.read_text().splitlines()[2:]
    return "\n".join("#" + line if line.startswith("## ") else
                     line if line.startswith("|") or not line else textwrap.fill(line, 110) for line in lines)


def tables():
    """{block name: its markdown} for the README's `<!-- benchmark:NAME -->` blocks, every number from docs/results."""
    return {"coin": main_table("coin", chosen_rates())}


def results_blocks():
    """{name: its markdown} for docs/results/README.md, every number from docs/results."""
    rates = chosen_rates()
    seconds = sum(json.loads(p.read_text()).get("seconds") or 0 for p in RESULTS.rglob("*.json"))
    blocks = {"rates": learning_table(rates), "cost": f"{seconds / 3600:.1f} hours",
              "routing": routing_tables(RESULTS / "coin" / "smolora" / "seed0-routing.md")}
    for experiment in EXPERIMENTS:
        blocks[experiment] = main_table(experiment, rates)
        if experiment in LEARNING_REFERENCE:
            blocks[experiment + "-learned"] = learned_table(experiment, LEARNING_REFERENCE[experiment])
    blocks["smolora-unseen"] = unseen_table("smolora")
    blocks["diverse-unseen"] = unseen_table("diverse")
    return blocks


BLOCK = re.compile(r"(<!-- benchmark:([\w-]+) -->\n)(.*?)(<!-- /benchmark -->)", re.S)   # content: lines
SLOT = re.compile(r"\{\{([\w-]+)\}\}")                                                  # {{NAME}} in RESULTS_PAGE


# docs/results/README.md: this text, each {{NAME}} replaced by results_blocks()[NAME]. It is written by --tables and
# remade by tests/test_benchmark.py, which fails on any difference: edit the text here, never the file.
RESULTS_PAGE = """\
# The benchmark: every table

<!-- Written by `python tests/benchmark.py --tables` from the result files in this folder. Do not edit it by
hand: tests/test_benchmark.py remakes it and fails on any difference. -->

Every number below is made by `tests/benchmark.py` from the result files committed beside this page, one JSON
file per run (`<experiment>/<row>/seed<k>.json`, SMoLoRA's `routing.md` beside it). The
[README](../../README.md#results) shows the CoIN table and says, claim by claim, what the numbers say about
the two papers.

```bash
python tests/benchmark.py             # runs what docs/results/ lacks (resumable), then rewrites the tables
python tests/benchmark.py --tables    # only rewrites the tables, this page and the pictures
```

## The protocol

- **Model, data, scale.** The pretrained tiny base and the synthetic mini-CoIN (made once, with seed 0, the
  same for every run), with the tiny defaults (r 32, alpha 64, 8 experts, top-1, batch 32, 8 epochs), 300
  training and 40 test records per task: one test sample of a VQA task is 2.5 points.
- **Learning rates, one rule for all.** Each method's rate is the one of 1e-3, 2e-3 and 5e-3 with the best MAP
  (Multitask: AP) on a validation sequence, ScienceQA -> TextVQA -> ImageNet, seed 0. The validation sequence
  trains on those tasks' training records but their last 60 and is scored on those 60, so no test record
  chooses a rate. The ablation's variants and the few-shot tuning take SMoLoRA's rate.
- **Three seeds.** Every row runs with seeds 0, 1 and 2, which move the adapters' initialisation, the data
  order and the dropout; the data stay the same. A table gives the mean ± the sample standard deviation over
  the seeds. A difference smaller than the spread is a tie.
- **Learned, or said not to be.** Under a table, its rows' mean scores on each task right after learning it,
  in bold where under 80% of DirLoRA's on that task: by this rule the row did not learn the task.
- **Evaluations from saved adapters.** The reworded-instruction rows and the ablation's full-method row train
  exactly like a row of another table (`SAME_TRAINING` in the script): they take its stage adapters and only
  evaluate. Where both exist, their matrices reproduced the originals' bit for bit.
- **Cost.** The runs' own wall times add up to {{cost}}; two ran at a time, one thread each, on the
  development machine's 2-core CPU.

How to read the columns:
- **AP** is the mean final score, **MFT** the mean score of each task right after it was learned, **MAP** the
  mean over stages of the mean score over the tasks seen so far, **BWT** the mean change from right after
  learning to the end (divided by T-1), **MIF** the mean share of final answers in the asked format, **GK**
  the mean final knowledge (the rule judge, `eval.knowledge`).
- The last three columns split an earlier task's drop, in points, by its final answers
  (`eval.dual_forgetting`): **format broke, knowledge kept** (lost instruction alignment, CoIN's finding),
  **format broke, knowledge lost**, and **format held** (the answer in the asked format, but wrong).

## The learning rates

Each method's validation MAP at each rate, and the rate chosen (a tie goes to the lower rate).

{{rates}}

## CoIN's 8 tasks, every method

{{coin}}

{{coin-learned}}

![CoIN: the means over the seeds](coin/compare.png)

## SMoLoRA's 6 tasks, with unseen tasks and Places365 few-shot

{{smolora}}

{{smolora-learned}}

The unseen tasks, never trained, after the last stage; Places365 after tuning one epoch on 5 and on 10
examples per class, from the final adapters (neither is in AP):

{{smolora-unseen}}

![SMoLoRA's tasks: the means over the seeds](smolora/compare.png)

## Reworded instructions

The same training as the table above (default wording), evaluated with the five paraphrases per task that
training never saw (`--instructions diverse`); the last row routes instructions by the task's identity, the
official scheme (`--if-routing task`, an oracle):

{{diverse}}

{{diverse-unseen}}

![reworded instructions: the means over the seeds](diverse/compare.png)

## SMoLoRA's ablation

On SMoLoRA's 6 tasks: the VU pool alone, the IF pool alone, both summed, both fused (the full method), with
the IF router reading each sample's instruction (`sample`, ours) or the task's (`task`, official), and the
full method with top-2 routing, which trains the routers.

{{ablation}}

{{ablation-learned}}

![the ablation: the means over the seeds](ablation/compare.png)

## Where SMoLoRA's routers send each task

CoIN, seed 0, after the last stage (`routing.md` of the run).

{{routing}}
"""


def with_tables(readme, blocks):
    """The README with every `<!-- benchmark:NAME -->` block's content replaced by blocks[NAME]."""
    return BLOCK.sub(lambda m: m.group(1) + blocks[m.group(2)] + "\n" + m.group(4), readme)


def results_page(blocks):
    """docs/results/README.md: RESULTS_PAGE with every {{NAME}} replaced by blocks[NAME]."""
    return SLOT.sub(lambda m: blocks[m.group(1)], RESULTS_PAGE)


def main(argv=None):
    p = argparse.ArgumentParser(description="The README's benchmark: runs what is missing, then the tables.")
    p.add_argument("--tables", action="store_true",
                   help="only rewrite the README's table, docs/results/README.md and the pictures from docs/results")
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each (default 2: one a core)")
    args = p.parse_args(argv)
    if not args.tables:
        run_all(args.workers)
    eval.write_atomic(README, with_tables(README.read_text(), tables()))
    eval.write_atomic(RESULTS_README, results_page(results_blocks()))
    for experiment, (_, table) in EXPERIMENTS.items():   # its picture: the means over the seeds, as bars
        runs = [mean_run(seeds_of(experiment, row), row) for row in table if seeds_of(experiment, row)]
        if runs:
            eval.write_comparison(RESULTS / experiment, runs)
    print(f"README table and {RESULTS_README.relative_to(ROOT)} rewritten from {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
