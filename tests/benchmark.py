"""The benchmark behind the README's Results: one protocol, five seeds, every claim of both papers put to a test.

    python tests/benchmark.py             # run what is missing (resumable at any point), then rewrite the tables
    python tests/benchmark.py --tables    # only rewrite the tables from docs/results/

The protocol (docs/results/README.md states it beside the tables):
1. A learning rate for each method and each variant of the ablation (rate_rows), chosen once: it runs the
   validation sequence (VALIDATION's three tasks, trained on their training records but the last
   VALIDATION_RECORDS, evaluated on those held-out ones, so no test record is ever seen) with LR_SEEDS at
   LR_START, and one LR_LADDER step past an edge each time the best falls on it; the best mean MAP (Multitask: AP)
   wins.
2. Every row of every experiment runs on SEEDS at its rate. The seed moves adapter init, data order and
   dropout; the synthetic data is the same for all (the one made with seed 0).
3. A finished run's results.json is copied at once to docs/results/<experiment>/<row>/seed<k>.json, its test
   items (test_items) beside it, SMoLoRA's routing.md too, so an interrupted benchmark loses at most the run under
   way. The tables are made from those files alone, every cell a mean over seeds and test items with a bootstrap
   interval: the README's headline table (its `<!-- benchmark:NAME -->` blocks) and docs/results/README.md,
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data   # noqa: E402
import eval   # noqa: E402
import smolora   # noqa: E402

RESULTS = ROOT / "docs" / "results"
RUNS = ROOT / "runs" / "benchmark"
README = ROOT / "README.md"
RESULTS_README = RESULTS / "README.md"   # every table, written whole from docs/results
SEEDS = (0, 1, 2, 3, 4)
LR_LADDER = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)   # the rates a learning rate is chosen among
LR_START = (1e-3, 2e-3, 5e-3)     # tried first; a best rate on an edge brings the next step past it
LR_SEEDS = (100, 101)             # the validation's: no validation run trains as a test run does
VALIDATION = ("scienceqa", "gqa", "textvqa")   # GQA: one the methods learn slowly (DirLoRA 79 of 100)
VALIDATION_RECORDS = 100
# records per task: every training record (1000; DirLoRA alone learns GQA to 48.5 on 300, 79 on 1000, as
# it does VQAv2 to 65.5 and 70.9), and 200 test records, a standard error of about 3 points on a share
SCALE = ("--max-test", "200")
CONTINUAL = [m for m in smolora.METHODS if m not in ("zeroshot", "multitask", "dirlora")]
UNSEEN = "vizwiz,textcaps,ocrvqa,places365"


COLUMN_NAMES = {"format_broke_knowledge_kept": "format broke, knowledge kept",
                "format_broke_knowledge_lost": "format broke, knowledge lost",
                "format_held": "format held, wrong"}


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
    eval.write_atomic(items_path(saved), json.dumps(test_items(out, results)) + "\n")
    eval.write_atomic(saved, json.dumps(results, indent=2) + "\n")     # last: the run is kept
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


def items_path(saved):
    return saved.with_name(saved.stem + "-items.json")


def test_items(out, results):
    """What a bootstrap resamples, from the run's saved predictions: per task, each test item's score
    (eval.item_scores) right after the task was learned ("after", where one task is learned a stage)
    and after the last stage ("final"), and there whether it is in the asked format ("follows", a
    string of 0 and 1) and its content's knowledge (eval.knowledge); per unseen task, its final
    scores; per few-shot task and k, its scores after that tuning."""
    def read(stage, task):
        return eval.load_predictions(out / "predictions" / stage / f"{task}.jsonl")

    def scores(task, predictions):
        return [round(v, 3) for v in eval.item_scores(
            task, [p["text"] for p in predictions], [p["answer"] for p in predictions])]

    stages, tasks = len(results["matrix"]) - 1, results["tasks"]
    items = {"tasks": {}, "unseen": {}, "fewshot": {}}
    for i, task in enumerate(tasks):
        predictions = read(f"stage{stages}", task)
        items["tasks"][task] = {
            "final": scores(task, predictions),
            "follows": "".join(str(int(eval.follows_instruction(task, p["text"], p["answer"])))
                               for p in predictions),
            "known": [round(k, 3) for k in eval.knowledge_of(task, predictions)]}
        if stages == len(tasks):
            items["tasks"][task]["after"] = scores(task, read(f"stage{i + 1}", task))
    for task in results.get("unseen", {}).get("tasks", []):
        items["unseen"][task] = scores(task, read(f"stage{stages}", task))
    for task, shots in (results.get("fewshot") or {}).items():
        items["fewshot"][task] = {k: scores(task, read(f"fewshot-{k}", task)) for k in shots}
    return items


def run_parallel(jobs, workers):
    """Each (flags, out, saved, trained) of jobs through run_once, `workers` at a time (one thread each: 2 on 2
    cores)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_once(*job), jobs))


def selection_score(results):
    return results["metrics"]["MAP"] if results["metrics"]["MAP"] is not None else results["metrics"]["AP"]


def rate_rows():
    """Whose learning rate is chosen apart -> the flags of its validation runs: every method but
    zeroshot (no training), and each variant of the ablation (the full method's is SMoLoRA's)."""
    found = {m: ("--method", m) for m in smolora.METHODS if m != "zeroshot"}
    for row, flags in EXPERIMENTS["ablation"][1].items():
        if row not in SAME_TRAINING["ablation"]:
            found[f"ablation: {row}"] = ("--method", "smolora", *flags)
    return found


def rate_of(experiment, row):
    """The rate_rows() name whose rate the row runs at."""
    if experiment == "ablation" and row not in SAME_TRAINING["ablation"]:
        return f"ablation: {row}"
    return method_of(EXPERIMENTS[experiment][1][row])


def rate_path(name, lr, seed):
    return RESULTS / "lr" / slug(name) / f"lr{lr:g}-seed{seed}.json"


def validation_scores(name):
    """{rate: the mean validation MAP over LR_SEEDS} of the rates whose every seed is saved."""
    scores = {}
    for lr in LR_LADDER:
        paths = [rate_path(name, lr, seed) for seed in LR_SEEDS]
        if all(path.exists() for path in paths):
            scores[lr] = statistics.mean(selection_score(json.loads(p.read_text())) for p in paths)
    return scores


def best_rate(scores):
    return max(scores, key=lambda lr: (scores[lr], -lr))     # a tie goes to the lower rate


def rates_to_try(scores):
    """LR_START, and one ladder step past an edge each time the best of those tried falls on it
    (while the ladder has one): the rates the choice is made among, once all are tried."""
    rates = list(LR_START)
    while all(lr in scores for lr in rates):
        step = LR_LADDER.index(best_rate({lr: scores[lr] for lr in rates}))
        if step == LR_LADDER.index(rates[0]) and step > 0:
            rates.insert(0, LR_LADDER[step - 1])
        elif step == LR_LADDER.index(rates[-1]) and step + 1 < len(LR_LADDER):
            rates.append(LR_LADDER[step + 1])
        else:
            break
    return rates


def rate_jobs(root):
    """The validation runs not saved yet, of the rates each name tries next."""
    return [(("--tasks", ",".join(VALIDATION), *flags, "--data", str(root), "--lr", f"{lr:g}",
              "--seed", str(seed), *SCALE), RUNS / "lr" / slug(name) / f"lr{lr:g}-seed{seed}",
             rate_path(name, lr, seed))
            for name, flags in rate_rows().items()
            for lr in rates_to_try(validation_scores(name)) for seed in LR_SEEDS
            if not rate_path(name, lr, seed).exists()]


def chosen_rates():
    """name -> (its learning rate, {rate: its validation MAP}), for the names whose bracket is
    complete: the best rate lies inside the rates tried, or at the ladder's end."""
    rates = {}
    for name in rate_rows():
        scores, bracket = validation_scores(name), rates_to_try(validation_scores(name))
        if all(lr in scores for lr in bracket):
            tried = {lr: scores[lr] for lr in bracket}
            rates[name] = (best_rate(tried), tried)
    return rates


def run_all(workers):
    root = validation_root()
    while jobs := rate_jobs(root):      # a round of rates, then the steps past the edges chosen
        if None in run_parallel(jobs, workers):
            sys.exit("benchmark: a validation run failed (named above): the rates cannot be chosen")
    rates, trains, evaluates = chosen_rates(), [], []
    for experiment, (common, table) in EXPERIMENTS.items():
        for row, flags in table.items():
            lr, source = rates.get(rate_of(experiment, row)), SAME_TRAINING.get(experiment, {}).get(row)
            (evaluates if source else trains).extend(
                ((*common, *flags, *SCALE, "--seed", str(seed), *(("--lr", f"{lr[0]:g}") if lr else ())),
                 RUNS / experiment / slug(row) / f"seed{seed}", RESULTS / experiment / slug(row) / f"seed{seed}.json",
                 source and RUNS / source[0] / slug(source[1]) / f"seed{seed}") for seed in SEEDS)
    run_parallel(trains, workers)
    run_parallel(evaluates, workers)   # after the runs whose adapters they take


# ----------------------------------------------------------------------------------------------
# Intervals and tests: a paired bootstrap over test items and seeds

RESAMPLES = 10_000
LEVEL = 0.05          # a difference is "better" or "worse" below this p-value, else a tie


def bootstrap(values):
    """The mean over tasks of each task's mean over (seed, item), its 95% interval and the p-value of
    "it is 0" (two-sided), by a bootstrap that draws the seeds, and within each task its test items,
    with replacement: the same seeds for every task (a seed is one run through all of them).
    values: per task, a (seeds, items) array, one row's per-item values, or the per-item difference
    of two rows run on the same items with the same seeds (a paired test). The interval is the
    resampled means' 2.5th and 97.5th percentiles; p = 2 min(P(mean* <= 0), P(mean* >= 0)), at most 1.
    Returns (mean, low, high, p)."""
    rng = np.random.default_rng(0)
    values = [np.asarray(v, dtype=float) for v in values]
    seeds = values[0].shape[0]
    # how often each seed, and each item of each task, is drawn in each resample
    seed_counts = rng.multinomial(seeds, [1 / seeds] * seeds, size=RESAMPLES)     # (R, S)
    means = np.zeros(RESAMPLES)
    for task in values:
        items = task.shape[1]
        item_counts = rng.multinomial(items, [1 / items] * items, size=RESAMPLES)  # (R, N)
        per_seed = item_counts @ task.T / items                                   # (R, S)
        # mean* = (1/T) sum_t (1/S) sum_s c_s (1/N_t) sum_i c_ti v_tsi, c the draws' counts
        means += (seed_counts * per_seed).sum(axis=1) / seeds / len(values)
    mean = float(np.mean([task.mean() for task in values]))
    low, high = np.percentile(means, [2.5, 97.5])
    p = min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0)))
    return mean, float(low), float(high), float(p)


def verdict(difference):
    """"better", "worse" or "tie" for bootstrap()'s result on a difference (row minus reference)."""
    mean, _, _, p = difference
    return "tie" if p >= LEVEL else "better" if mean > 0 else "worse"


def interval(stats):
    mean, low, high, _ = stats
    return f"{mean:.1f} [{low:.1f}, {high:.1f}]"


# ----------------------------------------------------------------------------------------------
# The tables, from docs/results alone

def seed_files(experiment, row):
    return sorted(p for p in (RESULTS / experiment / slug(row)).glob("seed*.json") if p.stem[4:].isdigit())


def seeds_of(experiment, row):
    return [json.loads(p.read_text()) for p in seed_files(experiment, row)]


def items_of(experiment, row):
    return [json.loads(items_path(p).read_text()) for p in seed_files(experiment, row)]


def caption_share(task):
    """What one point of the task's score counts in AP and the other columns: a caption task's CIDEr
    (a copy of the reference scores 1000) enters divided by 10, as a VQA task's 100 is its best."""
    return 0.1 if data.TASKS[task].scorer == "cider" else 1.0


def per_item(runs, column):
    """Per task, the (seeds, items) array of one column's per-item values, from the runs' test items
    (test_items); None where the runs do not have it (no stage per task: no MFT, BWT or split)."""
    tasks = list(runs[0]["tasks"])
    since_learning = column in ("BWT", *eval.SPLIT)
    if (column == "MFT" or since_learning) and "after" not in runs[0]["tasks"][tasks[0]]:
        return None
    if since_learning and len(tasks) < 2:
        return None
    if column == "CIDEr":
        tasks = [t for t in tasks if data.TASKS[t].scorer == "cider"]
        return [np.array([r["tasks"][t]["final"] for r in runs]) for t in tasks] or None
    arrays = []
    for task in tasks[:-1] if since_learning else tasks:
        def of(name):
            values = [[float(v) for v in r["tasks"][task][name]] for r in runs]
            return np.array(values) * (caption_share(task) if name in ("final", "after") else 1.0)
        final = of("final")
        if column == "AP":
            arrays.append(final)
        elif column == "MFT":
            arrays.append(of("after"))
        elif column == "BWT":           # BWT = (1/(T-1)) sum_{i<T} (A[T][i] - A[i][i]), per item
            arrays.append(final - of("after"))
        elif column == "MIF":
            arrays.append(100.0 * of("follows"))
        elif column == "GK":
            arrays.append(100.0 * of("known"))
        else:   # d = after - final, split by follows f and knowledge k: (1-f)k d, (1-f)(1-k) d, f d
            drop, follows, known = of("after") - final, of("follows"), of("known")
            arrays.append({"format_broke_knowledge_kept": (1 - follows) * known * drop,
                           "format_broke_knowledge_lost": (1 - follows) * (1 - known) * drop,
                           "format_held": follows * drop}[column])
    return arrays


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


def diagonal(results):
    matrix, stages = results["matrix"], len(results["matrix"]) - 1
    return [matrix[i + 1][i] for i in range(len(results["tasks"]))] if stages == len(results["tasks"]) else None


def table(header, lines):
    if not lines:
        return "_Not run yet._"
    return "\n".join([f"| {' | '.join(header)} |", "|---|" + "---:|" * (len(header) - 1), *lines])


def main_table(experiment, rates):
    """Each row's mean over its seeds and test items, with the paired bootstrap's 95% interval."""
    found = {row: items_of(experiment, row) for row in EXPERIMENTS[experiment][1]}
    found = {row: runs for row, runs in found.items() if runs}
    columns = ["AP", "MFT", "BWT", "MIF", "GK", *eval.SPLIT]
    if any(data.TASKS[t].scorer == "cider" for runs in found.values() for t in runs[0]["tasks"]):
        columns.insert(1, "CIDEr")
    lines = []
    for row, runs in found.items():
        lr = rates.get(rate_of(experiment, row))
        cells = [(lambda v: interval(bootstrap(v)) if v else "–")(per_item(runs, c)) for c in columns]
        lines.append(f"| {row} | {f'{lr[0]:g}' if lr else '–'} | " + " | ".join(cells) + " |")
    return table(("method", "lr", *(COLUMN_NAMES.get(c, c) for c in columns)), lines)


def unseen_table(experiment):
    """Each row's final score on the unseen tasks, then on each few-shot task after k-shot tuning (– where none):
    the mean over seeds and test items, with its bootstrap interval."""
    header, lines = (), []
    for row in EXPERIMENTS[experiment][1]:
        runs = items_of(experiment, row)
        if not runs or not runs[0]["unseen"]:
            continue
        tasks, shots = list(runs[0]["unseen"]), runs[0]["fewshot"]
        header = max(header, ("method", *tasks, *(f"{t} {k}-shot" for t, ks in shots.items() for k in ks)), key=len)
        cells = [interval(bootstrap([np.array([r["unseen"][t] for r in runs])])) for t in tasks]
        cells += [interval(bootstrap([np.array([r["fewshot"][t][k] for r in runs])]))
                  for t, ks in shots.items() for k in ks]
        lines.append((row, cells))
    return table(header, [f"| {row} | " + " | ".join(cells + ["–"] * (len(header) - 1 - len(cells))) + " |"
                          for row, cells in lines]) if header else ""


def learning_table(rates):
    """Each rate_rows() name's validation MAP at each rate tried (the mean over LR_SEEDS), and the rate
    chosen (– while the bracket is not complete)."""
    scores = {name: validation_scores(name) for name in rate_rows()}
    scores = {name: tried for name, tried in scores.items() if tried}
    tried_anywhere = sorted({lr for tried in scores.values() for lr in tried})
    lines = [f"| {name} | " + " | ".join(f"{tried[lr]:.1f}" if lr in tried else "–" for lr in tried_anywhere)
             + f" | {f'{rates[name][0]:g}' if name in rates else '–'} |" for name, tried in scores.items()]
    return table(("rate of", *(f"MAP at {lr:g}" for lr in tried_anywhere), "chosen"), lines)


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
    seconds = sum(json.loads(p.read_text()).get("seconds") or 0
                  for folder in ("lr", *EXPERIMENTS) for p in (RESULTS / folder).rglob("*.json"))
    blocks = {"rates": learning_table(rates), "cost": f"{seconds / 3600:.1f} hours",
              "resamples": f"{RESAMPLES:,}",
              "routing": routing_tables(RESULTS / "coin" / "smolora" / "seed0-routing.md")}
    for experiment in EXPERIMENTS:
        blocks[experiment] = main_table(experiment, rates)
        picture = f"{experiment}/compare.png"      # written by --tables once a row has run
        blocks[experiment + "-picture"] = (f"![{experiment}: the means over the seeds]({picture})"
                                           if (RESULTS / picture).exists() else "")
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
file per run (`<experiment>/<row>/seed<k>.json`), its test items beside it (`seed<k>-items.json`: each item's
score, format and knowledge, what the intervals resample) and SMoLoRA's `routing.md`. The
[README](../../README.md#results) shows the CoIN table.

```bash
python tests/benchmark.py             # runs what docs/results/ lacks (resumable), then rewrites the tables
python tests/benchmark.py --tables    # only rewrites the tables, this page and the pictures
```

## The protocol

- **Model, data, scale.** The pretrained tiny base and the synthetic mini-CoIN (made once, with seed 0, the
  same for every run), with the tiny defaults (r 32, alpha 64, 8 experts, top-1, batch 32, 8 epochs), every
  training record (1000 per task) and 200 test records per task. The training budget is the one at which
  DirLoRA, a fresh LoRA on one task alone, reaches its best: on GQA it scores 48.5 after 300 records x 8
  epochs, 52.5 after 1000 x 3 and 79.0 after 1000 x 8 (on VQAv2 65.5, 65.4 and 70.9).
- **Learning rates, one rule for all.** Each method, and each variant of the ablation, gets the rate with the
  best mean MAP (Multitask: AP) over two seeds (100 and 101, no test seed) on a validation sequence, ScienceQA
  -> GQA -> TextVQA. It trains on those tasks' training records but their last 100 and is scored on those
  100, so no test record chooses a rate. The rates tried first are 1e-3, 2e-3 and 5e-3; when the best falls on
  an edge, the next step of 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2 past it is tried too, until the best lies
  inside. Few-shot tuning takes its method's rate.
- **Five seeds.** Every row runs with seeds 0 to 4, which move the adapters' initialisation, the data order
  and the dropout; the data stay the same.
- **Intervals and tests.** A cell is the mean over the seeds and the test items, with its 95% interval from a
  bootstrap that draws the seeds, and within each task the test items, with replacement ({{resamples}}
  draws). Two rows are compared by the same bootstrap on their per-item difference (the same items, the same
  seeds: paired): "better" or "worse" below p = 0.05, else a tie.
- **Captions on the others' scale.** A caption task's CIDEr (a copy of its one reference scores 1000) enters
  AP and every column but its own divided by 10; the **CIDEr** column gives it raw, the mean over the
  caption tasks.
- **Learned, or said not to be.** Under a table, its rows' mean scores on each task right after learning it,
  in bold where under 80% of DirLoRA's on that task: by this rule the row did not learn the task.
- **Evaluations from saved adapters.** The reworded-instruction rows and the ablation's full-method row train
  exactly like a row of another table (`SAME_TRAINING` in the script): they take its stage adapters and only
  evaluate.
- **Cost.** The runs' own wall times add up to {{cost}}, one thread each, on the development machine's
  2-core CPU.

How to read the columns:
- **AP** is the mean final score, **MFT** the mean score of each task right after it was learned, **BWT** the
  mean change from right after learning to the end over the earlier tasks, **MIF** the mean share of final
  answers in the asked format, **GK** the mean final knowledge (the rule judge, `eval.knowledge`).
- The last three columns split an earlier task's drop since learning, item by item, by its final answer
  (`eval.dual_forgetting`'s split): **format broke, knowledge kept** (lost instruction alignment, CoIN's
  finding), **format broke, knowledge lost**, and **format held** (the answer in the asked format, but wrong).

## The learning rates

Each method's and each ablation variant's validation MAP at each rate, the mean over the two
validation seeds, and the rate chosen (a tie goes to the lower rate).

{{rates}}

## CoIN's 8 tasks, every method

{{coin}}

{{coin-learned}}

{{coin-picture}}

## SMoLoRA's 6 tasks, with unseen tasks and Places365 few-shot

{{smolora}}

{{smolora-learned}}

The unseen tasks, never trained, after the last stage; Places365 after tuning one epoch on 5 and on 10
examples per class, from the final adapters (neither is in AP):

{{smolora-unseen}}

{{smolora-picture}}

## Reworded instructions

The same training as the table above (default wording), evaluated with the five paraphrases per task that
training never saw (`--instructions diverse`); the last row routes instructions by the task's identity, the
official scheme (`--if-routing task`, an oracle):

{{diverse}}

{{diverse-unseen}}

{{diverse-picture}}

## SMoLoRA's ablation

On SMoLoRA's 6 tasks: the VU pool alone, the IF pool alone, both summed, both fused (the full method), with
the IF router reading each sample's instruction (`sample`, ours) or the task's (`task`, official), and the
full method with top-2 routing, which trains the routers.

{{ablation}}

{{ablation-learned}}

{{ablation-picture}}

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
