"""The benchmark behind the README's Results: one protocol, five seeds, every claim of both papers put to a test.

    python tests/benchmark.py             # run what is missing (resumable at any point), then rewrite the tables
    python tests/benchmark.py --tables    # only rewrite the tables from docs/results/

The protocol (docs/results/README.md states it beside the tables):
1. A learning rate for each method and each variant of the ablation (rate_rows), chosen once: it runs the
   validation sequence (VALIDATION's three tasks, trained on their training records but the last
   VALIDATION_RECORDS, evaluated on those held-out ones, so no test record is ever seen) with LR_SEEDS at
   LR_START, and one LR_LADDER step past an edge each time the best falls on it; the best mean MAP (Multitask: AP)
   wins.
2. The learning gate (gate_jobs): every sequential method trained on each task alone, its first stage, on
   GATE_SEEDS; under GATE_SHARE of DirLoRA's score on a task, its forgetting is shown apart, not ranked.
3. Every row of every experiment runs on SEEDS at its rate (the experiments that test a "why", savings, capacity,
   paraphrase and rate, on WHY_SEEDS; the one that tests the training budget on GATE_SEEDS). The seed moves adapter
   init, data order and dropout; the synthetic data is the same for all (the one made with seed 0).
   Seed by seed: seed 0 of every row first, so a benchmark stopped part way has every table, on fewer seeds.
4. A finished run's results.json is copied at once to docs/results/<experiment>/<row>/seed<k>.json, its test
   items (test_items) beside it, SMoLoRA's routing.md too, so an interrupted benchmark loses at most the run under
   way. The tables are made from those files alone, every cell a mean over seeds and test items with a bootstrap
   interval, and each claim of the papers a paired test (CLAIMS): the README's claims and headline table (its
   `<!-- benchmark:NAME -->` blocks) and docs/results/README.md, written whole from RESULTS_PAGE;
   tests/test_benchmark.py remakes both and fails on any difference.
"""
import argparse
import concurrent.futures
import functools
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
# records per task: every training record (1000, 8 epochs: the budget, tested by the "budget" experiment), and
# 200 test records, a standard error of about 3 points on a share
SCALE = ("--max-test", "200")
CONTINUAL = [m for m in smolora.METHODS if m not in ("zeroshot", "multitask", "dirlora")]
UNSEEN = "vizwiz,textcaps,ocrvqa,places365"
WHY_SEEDS = SEEDS[:3]             # the experiments that test a "why": three seeds each
GATE_SEEDS = SEEDS[:2]
GATE_SHARE = 0.9                  # learned: at least 90% of DirLoRA's score on the task
SHOTS = 5                         # savings: examples of each class of an earlier task, relearned


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
    # CoIN's claim (knowledge kept under a broken format): relearn each earlier task from the final adapters and
    # from fresh ones, SHOTS examples a class
    "savings": (("--tasks", "coin", *(a for t in data.COIN_TASKS[:-1] for a in ("--fewshot", f"{t}:{SHOTS}"))),
                rows(["lora", "moelora", "smolora"])),
    # SMoLoRA against LoRA at equal capacity, the parameters one sample passes through (sample_parameters): 163,840
    # for LoRA r 32 on every linear, 32,768 for SMoLoRA's two experts of rank 4 on the MLP and the projector with its
    # fusion vectors. The rank of each nearest the other's count: SMoLoRA's experts 22 (161,792), LoRA 9 on
    # SMoLoRA's linears (32,256); alpha keeps s = alpha / r = 2
    "capacity": (("--tasks", "smolora"),
                 {"smolora, experts of rank 22": ("--method", "smolora", "--r", "176", "--alpha", "352"),
                  "lora r 9 on SMoLoRA's linears": ("--method", "lora", "--layers", "smolora", "--r", "9",
                                                    "--alpha", "18")}),
    # SMoLoRA's paraphrase claim in its official multi-type setting: trained on 5 paraphrases a task, the IF router
    # reading each sample's wording (ours) or one vector a task, the mean of its 5 (official), evaluated on 5 others
    "paraphrase": (("--tasks", "smolora", "--train-instructions", "paraphrased", "--instructions", "diverse"),
                   {**rows(["lora", "smolora"]),
                    "smolora, task routing": ("--method", "smolora", "--if-routing", "task")}),
    # MoELoRA against LoRA at one rate, each at the other's
    "rate": (("--tasks", "coin"), {"lora at moelora's rate": ("--method", "lora"),
                                   "moelora at lora's rate": ("--method", "moelora")}),
    # the training budget, every record for 8 epochs: does DirLoRA reach its ceiling on GQA and VQAv2, two of the
    # tasks it learns least (each task a fresh LoRA of its own), against less of it and twice the epochs
    "budget": (("--tasks", "gqa,vqav2", "--method", "dirlora"),
               {"300 records x 8 epochs": ("--max-train", "300"), "1000 records x 3 epochs": ("--epochs", "3"),
                "1000 records x 8 epochs": (), "1000 records x 16 epochs": ("--epochs", "16")}),
}
BUDGET = "1000 records x 8 epochs"    # the benchmark's: smolora.py's defaults over the synthetic data's records
MAIN = ("coin", "smolora", "diverse", "ablation")   # the papers' tables; the rest test a "why"
EXPERIMENT_SEEDS = {"savings": WHY_SEEDS, "capacity": WHY_SEEDS, "paraphrase": WHY_SEEDS, "rate": WHY_SEEDS,
                    "budget": GATE_SEEDS}
RATE_OF = {"rate": {"lora at moelora's rate": "moelora", "moelora at lora's rate": "lora"}}


# rows trained exactly as a row of another experiment (same method, flags of training, rate and seed; they differ
# only in what is evaluated): they take that run's stage adapters and only evaluate (training is bit-reproducible)
SAME_TRAINING = {"diverse": {"lora": ("smolora", "lora"), "moelora": ("smolora", "moelora"),
                             "smolora": ("smolora", "smolora"),
                             "smolora, task routing": ("ablation", "vu,if,fusion, task")},
                 "ablation": {"vu,if,fusion, sample": ("smolora", "smolora")},
                 "savings": {m: ("coin", m) for m in EXPERIMENTS["savings"][1]}}

# whose DirLoRA diagonal an experiment's rows are held to, GATE_SHARE of it (the diverse wording is tested, not
# learned)
LEARNING_REFERENCE = {"coin": "coin", "smolora": "smolora", "ablation": "smolora"}


def slug(row):
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


def method_of(experiment, row):
    """The row's --method, its own or all its experiment's rows' (none: smolora.py's default, SMoLoRA)."""
    flags = (*EXPERIMENTS[experiment][1][row], *EXPERIMENTS[experiment][0])
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
    scores; per few-shot task and k, its scores after that tuning from the final adapters ("final")
    and from fresh ones ("fresh")."""
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
        items["fewshot"][task] = {k: {start: scores(task, read(f"fewshot-{k}{suffix}", task))
                                      for start, suffix in (("final", ""), ("fresh", "-fresh"))} for k in shots}
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
    return RATE_OF.get(experiment, {}).get(row) or method_of(experiment, row)


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
    rates = chosen_rates()
    run_parallel(gate_jobs(rates).values(), workers)
    trains, evaluates = {seed: [] for seed in SEEDS}, {seed: [] for seed in SEEDS}
    for experiment, (common, table) in EXPERIMENTS.items():
        for row, flags in table.items():
            lr, source = rates.get(rate_of(experiment, row)), SAME_TRAINING.get(experiment, {}).get(row)
            own = rates.get(method_of(experiment, row))
            if experiment in RATE_OF and (not lr or not own or lr[0] == own[0]):
                continue                # at its own rate the row is CoIN's
            for seed in EXPERIMENT_SEEDS.get(experiment, SEEDS):
                (evaluates if source else trains)[seed].append(
                    ((*common, *flags, *SCALE, "--seed", str(seed), *(("--lr", f"{lr[0]:g}") if lr else ())),
                     RUNS / experiment / slug(row) / f"seed{seed}",
                     RESULTS / experiment / slug(row) / f"seed{seed}.json",
                     source and RUNS / source[0] / slug(source[1]) / f"seed{seed}"))
    for seed in SEEDS:     # a seed of every row, then the next: a stop leaves whole tables on fewer seeds
        run_parallel(trains[seed], workers)
        run_parallel(evaluates[seed], workers)   # after the runs whose adapters they take


# ----------------------------------------------------------------------------------------------
# The learning gate: each sequential method trained on each task alone, as when the task comes first

FIRST_STAGE_AS_LORA = ("lora", "replay", "ewc", "dirlora")   # one task: nothing to replay, anchor or keep apart


def gate_run(method, experiment, lr):
    """(folder name, flags) of `method`'s first stage in `experiment`'s sequence, on any one task at rate lr.
    O-LoRA's rank is r/T for the sequence's T tasks: given as --r, with alpha scaled to keep s = alpha / r."""
    trains_as = "lora" if method in FIRST_STAGE_AS_LORA else method
    flags, folder = ("--method", trains_as, "--lr", f"{lr:g}"), f"{trains_as}-lr{lr:g}"
    if method == "olora":
        r, alpha, tasks = smolora.Config.r, smolora.Config.alpha, smolora.TASK_LISTS[experiment]
        rank = r // len(tasks)
        flags, folder = (*flags, "--r", str(rank), "--alpha", f"{alpha * rank / r:g}"), f"{folder}-r{rank}"
    return folder, flags


def gate_methods(experiment):
    return ["dirlora", *(m for m in EXPERIMENTS[experiment][1] if m in CONTINUAL)]


def gate_path(folder, task, seed):
    return RESULTS / "gate" / folder / f"{task}-seed{seed}.json"


def gate_jobs(rates):
    """{saved path: job} of the gate runs of every method whose rate is chosen, one per distinct training."""
    jobs = {}
    for experiment in ("coin", "smolora"):
        for method in gate_methods(experiment):
            if method in rates:
                folder, flags = gate_run(method, experiment, rates[method][0])
                for task in smolora.TASK_LISTS[experiment]:
                    for seed in GATE_SEEDS:
                        saved = gate_path(folder, task, seed)
                        jobs[saved] = ((*flags, "--tasks", task, *SCALE, "--seed", str(seed)),
                                       RUNS / "gate" / folder / f"{task}-seed{seed}", saved)
    return jobs


def gate_scores(experiment, rates):
    """{method: {task: its mean score over GATE_SEEDS trained on that task alone}}, for the methods all run."""
    found = {}
    for method in gate_methods(experiment):
        if method not in rates:
            continue
        folder, _ = gate_run(method, experiment, rates[method][0])
        paths = {t: [gate_path(folder, t, seed) for seed in GATE_SEEDS] for t in smolora.TASK_LISTS[experiment]}
        if all(p.exists() for ps in paths.values() for p in ps):
            found[method] = {t: statistics.mean(json.loads(p.read_text())["matrix"][1][0] for p in ps)
                             for t, ps in paths.items()}
    return found


def gate_failures(experiment, rates):
    """{method: the tasks it scores under GATE_SHARE of DirLoRA's on, alone}, for the methods gated."""
    scores = gate_scores(experiment, rates)
    reference = scores.get("dirlora")
    return {m: [t for t, v in mine.items() if v < GATE_SHARE * reference[t]]
            for m, mine in scores.items() if m != "dirlora"} if reference else {}


def failed_rows(experiment, rates):
    """{row: the tasks its method failed the learning gate on}, for the rows of a table that answer to a gate."""
    failed = gate_failures(GATED_BY[experiment], rates) if experiment in GATED_BY else {}
    return {row: failed[method_of(experiment, row)] for row in EXPERIMENTS[experiment][1]
            if failed.get(method_of(experiment, row))}


# ----------------------------------------------------------------------------------------------
# Intervals and tests: a paired bootstrap over test items and seeds

RESAMPLES = 10_000
LEVEL = 0.05          # a difference is "better" or "worse" below this p-value, else a tie


@functools.cache
def draws(size, stream):
    """How often each of `size` things is drawn in each of RESAMPLES resamples with replacement, (R, size): the
    same for every call of one stream and size, so a table's cells, and both sides of a paired test, resample
    alike, and a table of hundreds of cells draws each once."""
    rng = np.random.default_rng(stream)
    return rng.multinomial(size, [1 / size] * size, size=RESAMPLES).astype(np.min_scalar_type(size))


def bootstrap(values):
    """The mean over tasks of each task's mean over (seed, item), its 95% interval and the p-value of
    "it is 0" (two-sided), by a bootstrap that draws the seeds, and within each task its test items,
    with replacement: the same seeds for every task (a seed is one run through all of them).
    values: per task, a (seeds, items) array, one row's per-item values, or the per-item difference
    of two rows run on the same items with the same seeds (a paired test). The interval is the
    resampled means' 2.5th and 97.5th percentiles; p = 2 min(P(mean* <= 0), P(mean* >= 0)), at most 1.
    Returns (mean, low, high, p)."""
    values = [np.asarray(v, dtype=float) for v in values]
    seeds = values[0].shape[0]
    seed_counts = draws(seeds, 0)                                                 # (R, S)
    means = np.zeros(RESAMPLES)
    for stream, task in enumerate(values, start=1):                               # each task its own items' draws
        items = task.shape[1]
        per_seed = draws(items, stream) @ task.T / items                          # (R, S)
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

def saved_seeds(experiment, row):
    """The row's saved runs, {seed: path}."""
    return {int(p.stem[4:]): p for p in (RESULTS / experiment / slug(row)).glob("seed*.json") if p.stem[4:].isdigit()}


def seed_files(experiment, row, seeds=None):
    """The row's saved runs, by seed; only those of `seeds` if given."""
    saved = saved_seeds(experiment, row)
    return [saved[s] for s in sorted(saved) if seeds is None or s in seeds]


def seeds_of(experiment, row, seeds=None):
    return [json.loads(p.read_text()) for p in seed_files(experiment, row, seeds)]


def items_of(experiment, row, seeds=None):
    return [json.loads(items_path(p).read_text()) for p in seed_files(experiment, row, seeds)]


def paired_items(first, second, seeds=None):
    """items_of two (experiment, row) places on the seeds both have run (of `seeds` if given): a paired difference
    needs each seed on both sides, and one row may be a seed ahead of the other."""
    shared = {s for s in saved_seeds(*first).keys() & saved_seeds(*second).keys() if seeds is None or s in seeds}
    return items_of(*first, shared), items_of(*second, shared)


def caption_share(task):
    """What one point of the task's score counts in AP and the other columns: a caption task's CIDEr
    (a copy of the reference scores 1000) enters divided by 10, as a VQA task's 100 is its best."""
    return 0.1 if data.TASKS[task].scorer == "cider" else 1.0


def per_item(runs, column):
    """Per task, the (seeds, items) array of one column's per-item values, from the runs' test items
    (test_items); None where the runs do not have it (no stage per task: no MFT, BWT or split)."""
    if column == "unseen":
        return [np.array([r["unseen"][t] for r in runs]) * caption_share(t) for t in runs[0]["unseen"]] or None
    if column.startswith("fewshot"):      # fewshot/<start>: each few-shot task and k, tuned from <start> adapters
        start = column.split("/")[1]
        return [np.array([r["fewshot"][t][k][start] for r in runs]) * caption_share(t)
                for t, shots in runs[0]["fewshot"].items() for k in shots] or None
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


def picture_run(experiment, row):
    """What compare.png draws for a row: its mean run over the seeds, on the tables' scale (captions / 10): AP, BWT,
    MIF and GK the tables' means with their intervals, MAP and forgetting from the mean matrix so scaled, the
    forgetting split so scaled."""
    run = mean_run(seeds_of(experiment, row), row)
    shares = [caption_share(t) for t in run["tasks"]]
    stages = [[None if v is None else v * c for v, c in zip(line, shares)] for line in run["matrix"][1:]]
    if len(stages) == len(shares):
        run["metrics"] |= {k: eval.continual_metrics(stages)[k] for k in ("MAP", "forgetting")}
    run["dual_forgetting"] = {t: {k: v * caption_share(t) for k, v in split.items()}
                              for t, split in (run.get("dual_forgetting") or {}).items()}
    run["intervals"] = {}
    for column in ("AP", "BWT", "MIF", "GK"):
        if values := per_item(items_of(experiment, row), column):
            mean, low, high, _ = bootstrap(values)
            run["metrics"][column], run["intervals"][column] = mean, (low, high)
    return run


def picture_runs(experiment, rates):
    """compare.png's rows: those that passed the learning gate, then those that failed it, so named."""
    failed = failed_rows(experiment, rates)
    rows = sorted((row for row in EXPERIMENTS[experiment][1] if seed_files(experiment, row)), key=failed.__contains__)
    return [picture_run(experiment, row) | ({"method": f"{row} (failed the gate)"} if row in failed else {})
            for row in rows]


def diagonal(results):
    matrix, stages = results["matrix"], len(results["matrix"]) - 1
    return [matrix[i + 1][i] for i in range(len(results["tasks"]))] if stages == len(results["tasks"]) else None


def table(header, lines, words=1):
    """A markdown table; its first `words` columns aligned left, the numbers right."""
    if not lines:
        return "_Not run yet._"
    rule = "|" + "---|" * words + "---:|" * (len(header) - words)
    return "\n".join([f"| {' | '.join(header)} |", rule, *lines])


GATED_BY = {"coin": "coin", "smolora": "smolora", "diverse": "smolora"}   # whose gate a table's rows answer to


def row_cells(runs, columns):
    return [(lambda v: interval(bootstrap(v)) if v else "–")(per_item(runs, c)) for c in columns]


def main_table(experiment, rates):
    """Each row's mean over its seeds and test items, with the paired bootstrap's 95% interval; the rows of methods
    that failed the learning gate in a table of their own, below, with the tasks they failed on."""
    found = {row: items_of(experiment, row) for row in EXPERIMENTS[experiment][1]}
    found = {row: runs for row, runs in found.items() if runs}
    columns = ["AP", "MFT", "BWT", "MIF", "GK", *eval.SPLIT]
    if any(data.TASKS[t].scorer == "cider" for runs in found.values() for t in runs[0]["tasks"]):
        columns.insert(1, "CIDEr")
    failed = failed_rows(experiment, rates)
    learned, not_learned = [], []
    for row, runs in found.items():
        lr = rates.get(rate_of(experiment, row))
        tasks = failed.get(row)
        name = f"{row} (not: {', '.join(tasks)})" if tasks else row
        line = (f"| {name} | {f'{lr[0]:g}' if lr else '–'} | {len(runs)} | " + " | ".join(row_cells(runs, columns))
                + " |")
        (not_learned if tasks else learned).append(line)
    header = ("method", "lr", "seeds", *(COLUMN_NAMES.get(c, c) for c in columns))
    if not not_learned:
        return table(header, learned)
    return (table(header, learned) + "\n\nFailed the learning gate (the tasks named), so their forgetting is not "
            "ranked with the rows above:\n\n" + table(header, not_learned))


def unseen_table(experiment):
    """Each row's final score on the unseen tasks, then on each few-shot task after k-shot tuning from the final
    adapters and from fresh ones (– where none): the mean over seeds and test items, with its bootstrap interval;
    last, the majority class's score on each few-shot task."""
    header, lines, majority = (), [], {}
    for row in EXPERIMENTS[experiment][1]:
        runs = items_of(experiment, row)
        if not runs or not runs[0]["unseen"]:
            continue
        tasks, shots = list(runs[0]["unseen"]), runs[0]["fewshot"]
        header = max(header, ("method", *tasks, *(f"{t} {k}-shot{start}" for t, ks in shots.items() for k in ks
                                                  for start in ("", ", from fresh"))), key=len)
        cells = [interval(bootstrap([np.array([r["unseen"][t] for r in runs])])) for t in tasks]
        cells += [interval(bootstrap([np.array([r["fewshot"][t][k][start] for r in runs])]))
                  for t, ks in shots.items() for k in ks for start in ("final", "fresh")]
        lines.append((row, cells))
        majority |= {(t, k): v["majority"] for t, ks in seeds_of(experiment, row)[0].get("fewshot", {}).items()
                     for k, v in ks.items()}
    if not header:
        return ""
    if majority:
        lines.append(("majority class", ["–"] * len(tasks) + [f"{majority[t, k]:.1f}" for t, ks in shots.items()
                                                              for k in ks for _ in range(2)]))
    return table(header, [f"| {row} | " + " | ".join(cells + ["–"] * (len(header) - 1 - len(cells))) + " |"
                          for row, cells in lines])


def tested(stats):
    """A paired difference's verdict and p-value (p < 1/RESAMPLES where no draw crosses 0)."""
    p = stats[3]
    shown = f"< {1 / RESAMPLES:g}" if p == 0 else f"= {p:.3f}" if p >= 1e-3 else f"= {p:.4f}"   # p: a multiple of 2/R
    return f"{verdict(stats)}, p {shown}"


def difference(runs, others, column, other_column=None):
    """bootstrap() of the per-item difference, runs' column minus others' (other_column, else the same), two rows run
    on the same seeds and items."""
    return bootstrap([a - b for a, b in zip(per_item(runs, column), per_item(others, other_column or column))])


def compared(stats):
    """A difference's cell: its mean and interval, its verdict and p."""
    return f"{interval(stats)}, {tested(stats)}"


def gate_table(experiment, rates):
    """Each gated method's mean score on each task trained alone, its first stage (GATE_SEEDS), DirLoRA's first;
    **bold** under GATE_SHARE of DirLoRA's."""
    scores = gate_scores(experiment, rates)
    if "dirlora" not in scores:
        return table((), [])
    reference, tasks = scores["dirlora"], smolora.TASK_LISTS[experiment]
    lines = ["| DirLoRA, the reference | " + " | ".join(f"{reference[t]:.1f}" for t in tasks) + " | |"]
    for method, mine in scores.items():
        if method != "dirlora":
            short = [t for t in tasks if mine[t] < GATE_SHARE * reference[t]]
            lines.append(f"| {method} | " + " | ".join(f"**{mine[t]:.1f}**" if t in short else f"{mine[t]:.1f}"
                                                       for t in tasks) + f" | {'no' if short else 'yes'} |")
    return table(("trained alone", *tasks, "learns"), lines)


def listed(names):
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def gate_summary(rates, experiments=("coin", "smolora")):
    """The gate in a sentence, for the README: the methods that learn every task of the sequences alone, and the
    tasks each other one does not."""
    failed = {}
    for experiment in experiments:
        for method, tasks in gate_failures(experiment, rates).items():
            failed[method] = list(dict.fromkeys(failed.get(method, []) + tasks))
    if not failed:
        return "_Not run yet._"
    passed, short = [m for m, t in failed.items() if not t], {m: t for m, t in failed.items() if t}
    said = (f"Trained on each task alone, {listed(passed) or 'no method'} {'reach' if len(passed) > 1 else 'reaches'}"
            f" {GATE_SHARE:.0%} of DirLoRA's score on every task")
    said += "".join(f"; {m} does not on {listed(t)}" for m, t in short.items())
    return textwrap.fill(said + (": their forgetting is shown apart, not ranked." if short else "."), 110)


def savings_table():
    """Each row's earlier CoIN tasks: their final score, then relearned from the final adapters and from fresh ones
    on SHOTS examples a class; the savings (final minus fresh) with its paired test."""
    lines = []
    for row in EXPERIMENTS["savings"][1]:
        if runs := items_of("savings", row):
            relearned = [dict(r, tasks={t: r["tasks"][t] for t in r["fewshot"]}) for r in runs]   # their AP: final
            cells = row_cells(relearned, ["AP"]) + row_cells(runs, ["fewshot/final", "fewshot/fresh"])
            saved = difference(runs, runs, "fewshot/final", "fewshot/fresh")
            lines.append(f"| {row} | {len(runs)} | {' | '.join(cells)} | {interval(saved)} | {tested(saved)} |")
    return table(("method", "seeds", "final", f"{SHOTS}-shot from final", f"{SHOTS}-shot from fresh",
                  "savings", "test"), lines)


@functools.cache
def sample_parameters(flags):
    """The adapter parameters one sample passes through with these flags on the tiny model: all of a LoRA's; of
    SMoLoRA's, one expert of each pool (2 of E) and the fusion vectors (its routers are frozen)."""
    cfg = smolora.parse_configs(["--tasks", "scienceqa", *flags])[0]
    model = smolora.build_tiny_model(data.build_processor())
    smolora.add_adapters(model, smolora.METHODS[cfg.method].adapter,
                         None if cfg.layers == "own" else smolora.TARGETS[cfg.layers], **smolora.adapter_hparams(cfg))
    count = 0
    for module in model.modules():
        if isinstance(module, smolora.SMoLoRALinear):
            count += (module.lora_A.numel() + module.lora_B.numel()) * 2 // module.num_experts
            count += sum(p.numel() for n, p in module.named_parameters() if n.startswith("fuse_"))
        elif isinstance(module, smolora.LoRALinear):
            count += sum(p.numel() for p in module.parameters() if p.requires_grad)
    return count


def budget_table():
    """DirLoRA on each budget task alone (GATE_SEEDS): its score right after learning it, per task, and each row's
    mean over the tasks minus the budget's, with its paired test."""
    runs = {row: items_of("budget", row) for row in EXPERIMENTS["budget"][1]}
    lines = []
    for row, mine in runs.items():
        if mine:
            cells = [interval(bootstrap([task])) for task in per_item(mine, "MFT")]
            paired = paired_items(("budget", row), ("budget", BUDGET)) if row != BUDGET else ([], [])
            versus = difference(*paired, "MFT") if paired[0] else None
            lines.append(f"| {row}{' (the budget)' if row == BUDGET else ''} | {len(mine)} | {' | '.join(cells)} | "
                         + (compared(versus) if versus else "–") + " |")
    tasks = EXPERIMENTS["budget"][0][1].split(",")
    return table(("DirLoRA trained on", "seeds", *tasks, "minus the budget"), lines)


def capacity_table(rates):
    """SMoLoRA and LoRA of the SMoLoRA table and the capacity rows (WHY_SEEDS): parameters a sample passes through,
    AP, MFT, BWT, MIF; then each capacity row against its other: the paired AP difference and its test."""
    found = {"smolora": ("smolora", "smolora"), "lora": ("smolora", "lora"),
             **{row: ("capacity", row) for row in EXPERIMENTS["capacity"][1]}}
    runs = {row: items_of(*where, seeds=WHY_SEEDS) for row, where in found.items()}
    columns = ["AP", "MFT", "BWT", "MIF"]
    lines = [f"| {row} | {sample_parameters(EXPERIMENTS[where[0]][1][where[1]]):,} | "
             + " | ".join(row_cells(runs[row], columns)) + " |" for row, where in found.items() if runs[row]]
    against = {"smolora, experts of rank 22": "lora", "lora r 9 on SMoLoRA's linears": "smolora"}
    tests = [f"| {row} minus {other} | {interval(stats)} | {tested(stats)} |"
             for row, other in against.items() for paired in [paired_items(found[row], found[other], WHY_SEEDS)]
             if paired[0] for stats in [difference(*paired, "AP")]]
    return table(("row", "parameters a sample passes through", *columns), lines) + (
        "\n\n" + table(("AP", "difference", "test"), tests) if tests else "")


def paraphrase_table():
    """On held-out wordings (WHY_SEEDS): LoRA and SMoLoRA trained on one wording (the reworded table's) and on 5
    paraphrases a task, each SMoLoRA with its IF router reading the sample or the task; AP and MIF, then SMoLoRA
    minus LoRA in each training and the task's routing minus the sample's."""
    found = {f"{row}, {training}": (experiment, row) for training, experiment in
             (("one wording", "diverse"), ("paraphrased", "paraphrase"))
             for row in ("lora", "smolora", "smolora, task routing")}
    runs = {row: items_of(*where, seeds=WHY_SEEDS) for row, where in found.items()}
    columns = ["AP", "MIF"]
    lines = [f"| {row} | " + " | ".join(row_cells(runs[row], columns)) + " |" for row in found if runs[row]]
    pairs = [(f"smolora, {t}", f"lora, {t}") for t in ("one wording", "paraphrased")]
    pairs += [(f"smolora, task routing, {t}", f"smolora, {t}") for t in ("one wording", "paraphrased")]
    tests = [f"| {a} minus {b} | " + " | ".join(compared(difference(*paired, c)) for c in columns) + " |"
             for a, b in pairs for paired in [paired_items(found[a], found[b], WHY_SEEDS)] if paired[0]]
    return table(("trained on, evaluated on held-out wordings", *columns), lines) + (
        "\n\n" + table(("difference", *columns), tests) if tests else "")


def rate_table(rates):
    """LoRA and MoELoRA of the CoIN table and each at the other's rate (WHY_SEEDS): AP, BWT, MIF; then, at each
    rate, MoELoRA minus LoRA with its paired test."""
    found = {"lora": ("coin", "lora"), "moelora": ("coin", "moelora"),
             **{row: ("rate", row) for row in EXPERIMENTS["rate"][1]}}
    runs = {row: items_of(*where, seeds=WHY_SEEDS) for row, where in found.items()}
    columns = ["AP", "BWT", "MIF"]
    lr = {row: rates.get(rate_of(*where)) for row, where in found.items()}
    lines = [f"| {row} | {lr[row][0]:g} | " + " | ".join(row_cells(runs[row], columns)) + " |"
             for row in found if runs[row] and lr[row]]
    pairs = {"lora": ("moelora at lora's rate", "lora"), "moelora": ("moelora", "lora at moelora's rate")}
    tests = [f"| {lr[at][0]:g} ({at}'s) | " + " | ".join(compared(difference(*paired, c)) for c in columns) + " |"
             for at, (a, b) in pairs.items() for paired in [paired_items(found[a], found[b], WHY_SEEDS)] if paired[0]]
    return table(("row", "lr", *columns), lines) + (
        "\n\n" + table(("MoELoRA minus LoRA at", *columns), tests) if tests else "")


# Each claim of the two papers as a paired test: (paper, the claim, (experiment, row, column) of the side claimed
# higher, of the side claimed lower (a row, "baselines": the best of SMoLoRA's continual baselines on that column,
# or None: 0), the table whose experiment says why where it does not hold)
BASELINES = [m for m in CONTINUAL if m != "smolora"]
CLAIMS = [
    ("CoIN", "Tuning one task after another forgets: SeqLoRA's BWT is below 0", ("coin", "lora", "BWT"), "zero", ""),
    ("CoIN", "What is forgotten is mostly the format: more of SeqLoRA's drop keeps its knowledge than loses it",
     ("coin", "lora", "format_broke_knowledge_kept"), ("coin", "lora", "format_broke_knowledge_lost"), "savings"),
    ("CoIN", "The knowledge is kept: from its final adapters SeqLoRA relearns an earlier task better than from "
     "fresh ones", ("savings", "lora", "fewshot/final"), ("savings", "lora", "fewshot/fresh"), ""),
    ("CoIN", "MoELoRA forgets less than SeqLoRA (BWT)", ("coin", "moelora", "BWT"), ("coin", "lora", "BWT"),
     "rate-or-mixture"),
    ("CoIN", "MoELoRA scores higher than SeqLoRA (AP)", ("coin", "moelora", "AP"), ("coin", "lora", "AP"),
     "rate-or-mixture"),
    ("SMoLoRA", "SMoLoRA scores higher than every continual baseline (AP)", ("smolora", "smolora", "AP"),
     "baselines", "capacity"),
    ("SMoLoRA", "SMoLoRA follows the instructions best (MIF)", ("smolora", "smolora", "MIF"), "baselines",
     "capacity"),
    ("SMoLoRA", "SMoLoRA forgets less than every continual baseline (BWT)", ("smolora", "smolora", "BWT"),
     "baselines", "capacity"),
    ("SMoLoRA", "SMoLoRA does better on tasks never trained (unseen, zero-shot)", ("smolora", "smolora", "unseen"),
     "baselines", "capacity"),
    ("SMoLoRA", "SMoLoRA learns a new task from few examples better (Places365)",
     ("smolora", "smolora", "fewshot/final"), "baselines", "capacity"),
    ("SMoLoRA", "SMoLoRA keeps its lead under reworded instructions (AP)", ("diverse", "smolora", "AP"),
     ("diverse", "lora", "AP"), "paraphrases"),
    ("SMoLoRA", "Ablation: the IF pool alone beats the VU pool alone (AP)", ("ablation", "if, sample", "AP"),
     ("ablation", "vu, sample", "AP"), ""),
    ("SMoLoRA", "Ablation: both pools beat the IF pool alone (AP)", ("ablation", "vu,if, sample", "AP"),
     ("ablation", "if, sample", "AP"), ""),
    ("SMoLoRA", "Ablation: adaptive fusion beats summing the pools (AP)", ("ablation", "vu,if,fusion, sample", "AP"),
     ("ablation", "vu,if, sample", "AP"), ""),
]


def claim_row(claim, rates, page):
    """The claims table's line for one claim: the verdict, the evidence (the paired difference, side claimed higher
    minus the other, with its interval), the test, and where it does not hold the experiment that says why."""
    paper, text, (experiment, row, column), other, why = claim
    runs, forgetting = items_of(experiment, row), column in ("BWT", *eval.SPLIT)
    failed = gate_failures(GATED_BY[experiment], rates) if experiment in GATED_BY else {}
    if other == "baselines":     # forgetting: of the baselines that learned (passed the gate)
        scored = {m: per_item(items_of(experiment, m), column) for m in BASELINES
                  if items_of(experiment, m) and not (forgetting and failed.get(m))}
        if forgetting and runs and not scored and any(items_of(experiment, m) for m in BASELINES):
            return f"| {paper} | {text} | not shown: no baseline passed the learning gate | | | |"
        best = max(scored, key=lambda m: np.mean([v.mean() for v in scored[m]]), default=None)
        other = best and (experiment, best, column)
    theirs = None
    if other not in (None, "zero"):
        runs, theirs = paired_items((experiment, row), other[:2])
    if not runs or (other != "zero" and not theirs):
        return f"| {paper} | {text} | not run yet | | | |"
    if other == "zero":                              # claimed below 0: 0 minus it
        stats, against = bootstrap([-v for v in per_item(runs, column)]), "0 minus it"
    else:
        stats = difference(runs, theirs, column, other[2])
        against = f"minus {other[1] if other[:2] != (experiment, row) else COLUMN_NAMES.get(other[2], other[2])}"
    said = {"better": "holds", "worse": "does not hold", "tie": "not shown"}[verdict(stats)]
    unlearned = [m for m in dict.fromkeys((row, other != "zero" and other[1])) if failed.get(m)]
    if forgetting and unlearned:
        said = f"not shown: {', '.join(unlearned)} failed the learning gate"
    reason = f"[{why.replace('-', ' ')}]({page}#{why})" if why and said != "holds" else ""
    seeds = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
    return f"| {paper} | {text} | {said} | {interval(stats)} ({against}) | {tested(stats)}, {seeds} | {reason} |"


def claims_table(rates, page=""):
    """The claims, each a line of claim_row; `page`: where the experiments' tables are, from where it is shown."""
    return table(("paper", "claim", "verdict", "evidence: the difference [95% interval]", "test",
                  "why, where it does not hold"), [claim_row(c, rates, page) for c in CLAIMS], words=6)


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
    tasks, the trained wording) first; **bold** where under GATE_SHARE of DirLoRA's: the task was not learned."""
    rows, theirs = mean_diagonals(experiment), mean_diagonals(reference).get("dirlora")
    if not rows or not theirs:
        return ""
    tasks = seeds_of(reference, "dirlora")[0]["tasks"]
    lines = ["| DirLoRA, the reference | " + " | ".join(f"{v:.1f}" for v in theirs) + " |"]
    lines += [f"| {row} | " + " | ".join(f"**{v:.1f}**" if v < GATE_SHARE * best else f"{v:.1f}"
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
    rates = chosen_rates()
    return {"gate": gate_summary(rates), "claims": claims_table(rates, "docs/results/README.md"),
            "coin": main_table("coin", rates)}


def results_blocks():
    """{name: its markdown} for docs/results/README.md, every number from docs/results."""
    rates = chosen_rates()
    seconds = sum(json.loads(p.read_text()).get("seconds") or 0 for folder in ("lr", "gate", *EXPERIMENTS)
                  for p in (RESULTS / folder).rglob("*.json") if not p.stem.endswith("-items"))
    blocks = {"rates": learning_table(rates), "cost": f"{seconds / 3600:.1f} hours",
              "resamples": f"{RESAMPLES:,}", "claims": claims_table(rates),
              "coin-gate": gate_table("coin", rates), "smolora-gate": gate_table("smolora", rates),
              "savings": savings_table(), "capacity": capacity_table(rates), "rate": rate_table(rates),
              "budget": budget_table(),
              "paraphrase": paraphrase_table(),
              "routing": routing_tables(RESULTS / "coin" / "smolora" / "seed0-routing.md")}
    for experiment in MAIN:
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
  training record (1000 per task) and 200 test records per task. The training budget, 8 epochs over every
  record, was set for DirLoRA, a fresh LoRA on one task alone, to reach its ceiling; the table after this
  list tests it.
- **Learning rates, one rule for all.** Each method, and each variant of the ablation, gets the rate with the
  best mean MAP (Multitask: AP) over two seeds (100 and 101, no test seed) on a validation sequence, ScienceQA
  -> GQA -> TextVQA. It trains on those tasks' training records but their last 100 and is scored on those
  100, so no test record chooses a rate. The rates tried first are 1e-3, 2e-3 and 5e-3; when the best falls on
  an edge, the next step of 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2 past it is tried too, until the best lies
  inside. Few-shot tuning takes its method's rate.
- **Five seeds.** Every row runs with seeds 0 to 4, which move the adapters' initialisation, the data order
  and the dropout; the data stay the same. The benchmark runs seed 0 of every row, then seed 1, and so on:
  while it is under way a table's **seeds** column says how many a row has, and two rows are compared on
  the seeds both have run.
- **Intervals and tests.** A cell is the mean over the seeds and the test items, with its 95% interval from a
  bootstrap that draws the seeds, and within each task the test items, with replacement ({{resamples}}
  draws). Two rows are compared by the same bootstrap on their per-item difference (the same items, the same
  seeds: paired): "better" or "worse" below p = 0.05, else a tie.
- **Captions on the others' scale.** A caption task's CIDEr (a copy of its one reference scores 1000) enters
  AP and every column but its own divided by 10; the **CIDEr** column gives it raw, the mean over the
  caption tasks.
- **The learning gate.** Forgetting is only read where there was something to forget. Every sequential
  method is trained on each task alone, as its first stage in the sequence (two seeds, 0 and 1, at its rate;
  O-LoRA at its rank in the sequence, r/T). A method that scores under 90% of DirLoRA's score on any task
  fails the gate: its rows are shown apart, and no forgetting claim is read from them. On one task, SeqLoRA,
  replay, EWC and DirLoRA train alike (nothing to replay, anchor or keep apart); at the same rate they share one
  run. Under each main table, the rows' mean scores on each task right after learning it in the sequence, in
  bold under 90% of DirLoRA's.
- **Few-shot.** Tuning on k examples per class takes the fewest whole epochs that make 20 optimizer steps, from
  the final adapters and, beside it, from fresh ones; the majority class (every item given the answer most
  items accept) is printed under it.
- **Why, by experiment.** Each "why" below (savings, capacity, paraphrases, rate or mixture) is its own
  experiment on three seeds (0 to 2), compared with the same seeds of the main tables' rows, each row at its
  method's rate.
- **Evaluations from saved adapters.** The reworded-instruction rows and the ablation's full-method row train
  exactly like a row of another table (`SAME_TRAINING` in the script): they take its stage adapters and only
  evaluate.
- **Cost.** The runs' own wall times add up to {{cost}}, one thread each, on the development machine's
  2-core CPU.

The training budget, tested: DirLoRA on GQA and VQAv2 (two of the tasks it learns least, each with a fresh
LoRA of its own), its score right after learning each, at less of the budget and at twice its epochs (seeds 0
and 1); the last column is the mean over the two tasks minus the budget's, paired:

{{budget}}

How to read the columns:
- **AP** is the mean final score, **MFT** the mean score of each task right after it was learned, **BWT** the
  mean change from right after learning to the end over the earlier tasks, **MIF** the mean share of final
  answers in the asked format, **GK** the mean final knowledge (the rule judge, `eval.knowledge`).
- The last three columns split an earlier task's drop since learning, item by item, by its final answer
  (`eval.dual_forgetting`'s split): **format broke, knowledge kept** (lost instruction alignment, CoIN's
  finding), **format broke, knowledge lost**, and **format held** (the answer in the asked format, but wrong).

## What the numbers say: each claim, tested

A claim holds when its paired difference (the side claimed higher minus the other, over the same seeds and
test items) is above 0 at p < 0.05; it does not hold when it is below 0 so; else it is not shown. Against
"every continual baseline", the difference is taken with the baseline scoring highest on that column (on a
forgetting column, of those that passed the learning gate).

{{claims}}

## The learning rates

Each method's and each ablation variant's validation MAP at each rate, the mean over the two
validation seeds, and the rate chosen (a tie goes to the lower rate). A variant routing the IF pool by the
task scores as the one routing it by the sample, to the bit: on these three tasks each sample's instruction
is its task's canonical one (none has a fixed question), so both routers read the same vector. Of SMoLoRA's
6 tasks, they read different vectors on ImageNet and Flickr30k alone, whose canonical string holds the question.

{{rates}}

## The learning gate

Each sequential method's mean score on each task trained alone, in CoIN's sequence and in SMoLoRA's (whose
O-LoRA has another rank); in bold under 90% of DirLoRA's.

{{coin-gate}}

{{smolora-gate}}

## CoIN's 8 tasks, every method

{{coin}}

{{coin-learned}}

{{coin-picture}}

## SMoLoRA's 6 tasks, with unseen tasks and Places365 few-shot

{{smolora}}

{{smolora-learned}}

The unseen tasks, never trained, after the last stage; Places365 after tuning on 5 and on 10 examples per
class (at least 20 steps), from the final adapters and from fresh ones, the majority class below (none is in
AP):

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

## Savings

CoIN reads its forgetting as lost instruction alignment, with the knowledge kept. If so, the final adapters
relearn an earlier task faster than fresh ones do. After CoIN's 8 tasks, each of the 7 earlier tasks is tuned
again on 5 examples per class, from the final adapters and from fresh ones, and scored (the mean over those 7
tasks):

{{savings}}

## Capacity

Does SMoLoRA lose to LoRA by its design or by its size? A sample passes through one expert of each pool, on
the MLP and the projector: far fewer parameters than LoRA's on every linear. On SMoLoRA's 6 tasks, SMoLoRA
with experts large enough to match LoRA's count, and LoRA cut to SMoLoRA's count and linears:

{{capacity}}

## Paraphrases

SMoLoRA's paper trains its multi-type setting on 5 paraphrased instructions per task, and its official code
routes each task on one vector, the mean of its 5 paraphrases' embeddings. Here, on SMoLoRA's 6 tasks, LoRA and
SMoLoRA trained on one wording (the reworded table's runs) and on 5 paraphrases a task, SMoLoRA's IF router
reading each sample's wording or its task's vector, all evaluated on 5 other wordings never trained on:

{{paraphrase}}

## Rate or mixture

Is a difference between MoELoRA and LoRA their design or their learning rates? On CoIN, each at the other's
rate (when both chose the same rate, there is nothing to run):

{{rate}}

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
    rates = chosen_rates()
    for experiment in MAIN:   # its picture: the means over the seeds, as bars, and their intervals
        if runs := picture_runs(experiment, rates):
            eval.write_comparison(RESULTS / experiment, runs)
    print(f"README table and {RESULTS_README.relative_to(ROOT)} rewritten from {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
