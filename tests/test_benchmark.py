"""The results tables are what docs/results/ holds: the README's headline table and docs/results/README.md, remade
from those files, must match to the digit."""
import json
import re

import numpy as np
import pytest

import benchmark


def test_readme_table_is_made_from_docs_results():
    readme = benchmark.README.read_text()
    assert [m[1] for m in benchmark.BLOCK.findall(readme)] == ["gate", "claims", "coin"], "the README's blocks"
    assert benchmark.with_tables(readme, benchmark.tables()) == readme, \
        "the README's table differs from docs/results: run python tests/benchmark.py --tables"


def test_results_page_is_made_from_docs_results():
    blocks = benchmark.results_blocks()
    assert set(benchmark.SLOT.findall(benchmark.RESULTS_PAGE)) == set(blocks), "a table made but not shown, or a slot"
    assert benchmark.RESULTS_README.exists(), "run python tests/benchmark.py --tables"
    assert benchmark.results_page(blocks) == benchmark.RESULTS_README.read_text(), \
        "docs/results/README.md differs from docs/results: run python tests/benchmark.py --tables"


def test_results_page_lines_are_readable():
    page = benchmark.RESULTS_README.read_text().splitlines()
    assert [n for n, line in enumerate(page, 1) if len(line) > 115 and not line.startswith("|")] == []


def results(diagonal, seconds=60.0):
    """A two-task run's results.json, as far as the tables read it."""
    return {"method": "lora", "tasks": ["scienceqa", "textvqa"], "seconds": seconds, "metrics": {},
            "matrix": [[0, 0], [diagonal[0], 0], [50, diagonal[1]]]}


def items(sqa_after, sqa_final, sqa_follows, sqa_known, tvqa_final, tvqa_follows, tvqa_known):
    """A two-task run's test items (benchmark.test_items), four per task; TextVQA, learned last, is
    scored right after learning as at the end."""
    return {"tasks": {"scienceqa": {"after": sqa_after, "final": sqa_final, "follows": sqa_follows,
                                    "known": sqa_known},
                      "textvqa": {"after": tvqa_final, "final": tvqa_final, "follows": tvqa_follows,
                                  "known": tvqa_known}}, "unseen": {}, "fewshot": {}}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A toy experiment of two rows and two seeds in a docs/results of its own."""
    monkeypatch.setattr(benchmark, "RESULTS", tmp_path)
    monkeypatch.setattr(benchmark, "EXPERIMENTS", {"toy": ((), {"lora": ("--method", "lora"),
                                                                "dirlora": ("--method", "dirlora")})})
    runs = {"lora": [(results((90, 60)), items([100, 100, 0, 100], [0, 100, 0, 0], "0100", [1, 1, 0, 0],
                                               [100, 100, 0, 0], "1111", [1, 1, 0, 0])),
                     (results((70, 60)), items([100, 100, 100, 100], [100, 100, 0, 0], "1100", [1, 1, 0, 1],
                                               [100, 0, 0, 0], "1111", [1, 0, 0, 0]))],
            "dirlora": [(results((80, 100)), items([100] * 4, [100] * 4, "1111", [1] * 4, [100] * 4, "1111",
                                                   [1] * 4))] * 2}
    for row, seeds in runs.items():
        (tmp_path / "toy" / row).mkdir(parents=True)
        for k, (r, i) in enumerate(seeds):
            (tmp_path / "toy" / row / f"seed{k}.json").write_text(json.dumps(r))
            (tmp_path / "toy" / row / f"seed{k}-items.json").write_text(json.dumps(i))


def test_a_table_is_the_mean_over_seeds_and_items_with_its_interval(toy):
    header, _, lora, dirlora = benchmark.main_table("toy", {"lora": (2e-3, {})}).splitlines()
    assert header == ("| method | lr | seeds | AP | MFT | BWT | MIF | GK | format broke, knowledge kept | "
                      "format broke, knowledge lost | format held, wrong |")
    cells = [c.strip() for c in lora.split("|")[1:-1]]
    means = [float(c.split(" [")[0]) for c in cells[3:]]
    # AP: ScienceQA's final 25, 50 and TextVQA's 50, 25 -> 37.5; MFT (75 + 100) / 2 and 37.5 -> 62.5;
    # BWT: ScienceQA's final - after, -50 in both seeds; MIF: ScienceQA 1/4, 2/4, TextVQA all -> 68.75;
    # GK: (50 + 75) / 2 and (50 + 25) / 2 -> 50. The drop since learning, per item, seed 0: 100 on
    # items 0 (out of format, known: kept) and 3 (out of format, not known: lost); seed 1: 100 on
    # items 2 (lost) and 3 (kept) -> kept 25, lost 25, held 0
    assert cells[:3] == ["lora", "0.002", "2"] and means == [37.5, 62.5, -50.0, 68.8, 50.0, 25.0, 25.0, 0.0]
    assert cells[-1] == "0.0 [0.0, 0.0]"
    low, high = map(float, cells[3].split(" [")[1].rstrip("]").split(", "))
    assert low < 37.5 < high
    assert dirlora.startswith("| dirlora | – | 2 | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] |")


def test_a_task_under_80_percent_of_dirlora_right_after_learning_is_bold(toy):
    # right after learning: scienceqa 90, 70 -> 80 against DirLoRA's 80, learned; textvqa 60 against 100, not
    assert benchmark.learned_table("toy", "toy").splitlines() == [
        "| right after learning | scienceqa | textvqa |", "|---|---:|---:|",
        "| DirLoRA, the reference | 80.0 | 100.0 |", "| lora | 80.0 | **60.0** |"]


def test_blocks_and_slots_are_replaced_and_the_rest_kept(monkeypatch):
    readme = "intro\n<!-- benchmark:a -->\nold\n<!-- /benchmark -->\nmiddle\n<!-- benchmark:b -->\n\n<!-- /benchmark -->\n"
    assert benchmark.with_tables(readme, {"a": "| x |", "b": "new"}) == \
        "intro\n<!-- benchmark:a -->\n| x |\n<!-- /benchmark -->\nmiddle\n<!-- benchmark:b -->\nnew\n<!-- /benchmark -->\n"
    with pytest.raises(KeyError):
        benchmark.with_tables(readme, {"a": ""})
    monkeypatch.setattr(benchmark, "RESULTS_PAGE", "# t\n\n{{a}}\n\ntext {{b-c}}.\n")
    assert benchmark.results_page({"a": "| x |", "b-c": "3.7 hours"}) == "# t\n\n| x |\n\ntext 3.7 hours.\n"
    with pytest.raises(KeyError):
        benchmark.results_page({"a": ""})


def test_committed_results_hold_no_path_of_the_machine_they_ran_on():
    absolute = re.compile(r'": "(/|[A-Za-z]:\\\\)')          # a JSON value "/..." or "C:\\..."
    assert [p.name for p in benchmark.RESULTS.rglob("*.json") if absolute.search(p.read_text())] == []
    cache = str(benchmark.smolora.CACHE)
    ran = {"config": {"out": "/home/someone/smolora/runs/benchmark/coin/lora/seed0", "cache": cache,
                      "data": cache + "/benchmark-validation", "model": None}}
    assert benchmark.portable(ran)["config"] == {
        "out": "runs/benchmark/coin/lora/seed0", "cache": "$SMOLORA_CACHE",
        "data": "$SMOLORA_CACHE/benchmark-validation", "model": None}


def test_bootstrap_of_a_constant_and_of_nothing():
    assert benchmark.bootstrap([np.full((3, 50), 10.0), np.full((3, 20), 10.0)]) == (10.0, 10.0, 10.0, 0.0)
    assert benchmark.bootstrap([np.zeros((3, 50))]) == (0.0, 0.0, 0.0, 1.0)


def test_a_p_value_is_never_shown_as_0():
    assert [benchmark.tested((1.0, 0.5, 1.5, p)) for p in (0.0, 0.0004, 0.0312, 0.5)] == [
        "better, p < 0.0001", "better, p = 0.0004", "better, p = 0.031", "tie, p = 0.500"]


def test_every_bootstrap_draws_alike():
    # the draws are shared (cached per size and task): a row shifted by 5 has its interval shifted by 5, exactly
    values = np.random.default_rng(1).normal(size=(3, 40))
    mean, low, high, _ = benchmark.bootstrap([values, values[:, :30]])
    shifted = benchmark.bootstrap([values + 5, values[:, :30] + 5])
    assert np.allclose(shifted[:3], (mean + 5, low + 5, high + 5))


def test_bootstrap_draws_seeds_with_replacement():
    # two seeds whose every item scores 40 and 60: the resampled seed pairs are (40, 40), (40, 60) and
    # (60, 60) with chances 1/4, 1/2, 1/4, so the means 40, 50, 60 and the 95% interval [40, 60]
    mean, low, high, _ = benchmark.bootstrap([np.array([[40.0] * 30, [60.0] * 30])])
    assert (mean, low, high) == (50.0, 40.0, 60.0)


def test_bootstrap_interval_of_a_share_is_the_binomial_one():
    # one seed, 200 items half right: the interval is about 50 -+ 1.96 sqrt(50 * 50 / 200) = 50 -+ 6.93
    mean, low, high, p = benchmark.bootstrap([np.array([[0.0, 100.0] * 100])])
    assert mean == 50.0 and low == pytest.approx(43.07, abs=0.8) and high == pytest.approx(56.93, abs=0.8)
    assert p < 1e-3


def test_verdicts_follow_the_paired_test():
    # row minus reference on 200 items: +100 on 30 items, -100 on 10 -> +10 points, p well below 0.05;
    # +100 on 11, -100 on 10 -> +0.5, a tie
    better = np.array([[100.0] * 30 + [-100.0] * 10 + [0.0] * 160])
    tie = np.array([[100.0] * 11 + [-100.0] * 10 + [0.0] * 179])
    assert benchmark.verdict(benchmark.bootstrap([better])) == "better"
    assert benchmark.verdict(benchmark.bootstrap([-better])) == "worse"
    assert benchmark.verdict(benchmark.bootstrap([tie])) == "tie"
    assert benchmark.interval((10.0, 4.5, 15.25, 0.001)) == "10.0 [4.5, 15.2]"


def test_test_items_are_read_from_the_saved_predictions(tmp_path):
    def save(stage, task, texts, answers):
        benchmark.eval.save_predictions(tmp_path / "predictions" / stage / f"{task}.jsonl", [
            {"question_id": i, "prompt": "", "text": t, "answer": a}
            for i, (t, a) in enumerate(zip(texts, answers))])
    save("stage1", "scienceqa", ["A", "B"], ["A", "A"])
    save("stage2", "scienceqa", ["It is B", "A"], ["A", "A"])
    save("stage2", "textvqa", ["SUN", "The sign says MAP."], ["sun", "map"])
    save("stage2", "vizwiz", ["no"], ["yes"])
    save("fewshot-5", "places365", ["grid", "dots"], ["grid", "grid"])
    save("fewshot-5-fresh", "places365", ["dots", "dots"], ["grid", "grid"])
    results = {"tasks": ["scienceqa", "textvqa"], "matrix": [[0, 0], [50, 0], [50, 50]],
               "unseen": {"tasks": ["vizwiz"]}, "fewshot": {"places365": {"5": {}}}}
    items = benchmark.test_items(tmp_path, results)
    # ScienceQA: right after learning A right, B wrong; at the end "It is B" (wrong, out of format,
    # knows B: not the answer) and "A"
    assert items["tasks"]["scienceqa"] == {"after": [100.0, 0.0], "final": [0.0, 100.0], "follows": "01",
                                           "known": [0.0, 1.0]}
    # TextVQA, learned last: right after learning is the end; a sentence is out of format but known
    assert items["tasks"]["textvqa"] == {"after": [100.0, 0.0], "final": [100.0, 0.0], "follows": "10",
                                         "known": [1.0, 1.0]}
    assert items["unseen"] == {"vizwiz": [0.0]}
    assert items["fewshot"] == {"places365": {"5": {"final": [100.0, 0.0], "fresh": [0.0, 0.0]}}}


def test_a_rate_chosen_at_an_edge_of_those_tried_brings_the_next_step_past_it():
    try_next = benchmark.rates_to_try
    assert try_next({}) == [1e-3, 2e-3, 5e-3]
    assert try_next({1e-3: 40, 2e-3: 50, 5e-3: 45}) == [1e-3, 2e-3, 5e-3]         # inside: done
    assert try_next({1e-3: 40, 2e-3: 50, 5e-3: 55}) == [1e-3, 2e-3, 5e-3, 1e-2]   # the top edge
    assert try_next({1e-3: 40, 2e-3: 50, 5e-3: 55, 1e-2: 54}) == [1e-3, 2e-3, 5e-3, 1e-2]
    assert try_next({1e-3: 60, 2e-3: 50, 5e-3: 40, 5e-4: 61, 2e-4: 62}) == [2e-4, 5e-4, 1e-3, 2e-3, 5e-3]
    assert try_next({1e-3: 40, 2e-3: 50, 5e-3: 55, 1e-2: 56, 2e-2: 57}) == [1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
    assert benchmark.best_rate({1e-3: 50, 2e-3: 50}) == 1e-3                       # a tie: the lower


@pytest.fixture
def gated(toy, tmp_path, monkeypatch):
    """The toy's two rows gated on its two tasks: alone, DirLoRA scores ScienceQA 80 and 90 (85), TextVQA 100 and
    100; SeqLoRA 80 and 70 (75, under 90% of 85: fails) and 95 and 85 (90: passes)."""
    monkeypatch.setitem(benchmark.smolora.TASK_LISTS, "toy", ("scienceqa", "textvqa"))
    monkeypatch.setitem(benchmark.GATED_BY, "toy", "toy")
    rates = {"lora": (2e-3, {}), "dirlora": (1e-3, {})}
    for folder, scores in {"lora-lr0.001": {"scienceqa": (80, 90), "textvqa": (100, 100)},
                           "lora-lr0.002": {"scienceqa": (80, 70), "textvqa": (95, 85)}}.items():
        for task, by_seed in scores.items():
            for seed, score in zip(benchmark.GATE_SEEDS, by_seed):
                path = benchmark.gate_path(folder, task, seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"matrix": [[0], [score]]}))
    return rates


def test_a_method_under_90_percent_of_dirlora_alone_fails_the_gate_and_is_shown_apart(gated):
    assert benchmark.gate_failures("toy", gated) == {"lora": ["scienceqa"]}
    assert benchmark.gate_table("toy", gated).splitlines()[2:] == [
        "| DirLoRA, the reference | 85.0 | 100.0 | |", "| lora | **75.0** | 90.0 | no |"]
    learned, note, failed = benchmark.main_table("toy", gated).split("\n\n")
    assert "| dirlora |" in learned and "lora (not" not in learned and "not ranked" in note
    assert failed.splitlines()[2].startswith("| lora (not: scienceqa) | 0.002 | 2 | 37.5 [")
    # the picture, too: the rows that learned first, then those that did not, so named
    assert [run["method"] for run in benchmark.picture_runs("toy", gated)] == ["dirlora", "lora (failed the gate)"]
    assert [run["method"] for run in benchmark.picture_runs("toy", {})] == ["lora", "dirlora"]


def test_the_readme_says_the_gate_in_a_sentence(gated):
    assert benchmark.gate_summary(gated, ("toy",)) == ("Trained on each task alone, no method reaches 90% of DirLoRA's "
                                                       "score on every task; lora does not on\n"
                                                       "scienceqa: their forgetting is shown apart, not ranked.")
    assert benchmark.gate_summary({}, ("toy",)) == "_Not run yet._"


def test_gate_runs_are_shared_where_the_first_stage_trains_alike():
    rates = {m: (1e-3, {}) for m in benchmark.smolora.METHODS}
    jobs = benchmark.gate_jobs(rates)
    folders = {path.parent.name for path in jobs}
    # SeqLoRA, replay, EWC, DirLoRA: one run a task; O-LoRA at rank 32/8 in CoIN, 32/6 in SMoLoRA's sequence
    assert folders == {"lora-lr0.001", "olora-lr0.001-r4", "olora-lr0.001-r5", "dora-lr0.001", "moelora-lr0.001",
                       "smolora-lr0.001"}
    flags = jobs[benchmark.gate_path("olora-lr0.001-r4", "gqa", 1)][0]
    assert " ".join(flags).startswith("--method olora --lr 0.001 --r 4 --alpha 8 --tasks gqa --max-test 200 --seed 1")
    # both seeds: CoIN's 8 tasks x 5 folders; SMoLoRA's Flickr30k x 4, and its 6 tasks for O-LoRA at rank 5
    assert len(jobs) == 2 * (8 * 5 + 4 + 6)


def test_claims_read_the_paired_test_and_the_gate(gated, monkeypatch):
    monkeypatch.setattr(benchmark, "BASELINES", ["lora"])
    claims = [("P", "DirLoRA beats SeqLoRA", ("toy", "dirlora", "AP"), ("toy", "lora", "AP"), "capacity"),
              ("P", "SeqLoRA beats DirLoRA", ("toy", "lora", "AP"), ("toy", "dirlora", "AP"), "capacity"),
              ("P", "DirLoRA beats the baselines", ("toy", "dirlora", "AP"), "baselines", ""),
              ("P", "SeqLoRA forgets", ("toy", "lora", "BWT"), "zero", ""),
              ("P", "not run", ("toy", "olora", "AP"), ("toy", "lora", "AP"), ""),
              ("P", "DirLoRA forgets less than the baselines", ("toy", "dirlora", "BWT"), "baselines", "")]
    first = benchmark.claim_row(claims[0], gated, "page.md")
    rows = [benchmark.claim_row(c, gated, "page.md").split(" | ") for c in claims]
    # DirLoRA's AP 100 against SeqLoRA's 37.5, on the same items and seeds
    assert rows[0][2:4] == ["holds", rows[0][3]] and rows[0][3].startswith("62.5 [") and rows[0][3].endswith(
        "(minus lora)") and rows[0][4].startswith("better, p ") and rows[0][5] == " |"
    assert rows[1][2] == "does not hold" and rows[1][3].startswith("-62.5 [") and rows[1][5] == "[capacity](page.md#capacity) |"
    assert rows[2][2] == "holds" and rows[2][3].endswith("(minus lora)")
    assert rows[3][2] == "not shown: lora failed the learning gate" and rows[3][3].startswith("50.0 [")
    assert rows[4][2] == "not run yet"
    assert rows[5][2] == "not shown: no baseline passed the learning gate"       # SeqLoRA, the one, failed it
    # at DirLoRA's rate SeqLoRA alone trains as DirLoRA does, and passes: its forgetting is read
    passed = {**gated, "lora": (1e-3, {})}
    assert benchmark.gate_failures("toy", passed) == {"lora": []}
    rows = [benchmark.claim_row(c, passed, "page.md").split(" | ") for c in (claims[3], claims[5])]
    # BWT -50 in both seeds, but over 4 items of which 2 dropped: the test cannot tell it from 0
    assert rows[0][2:4] == ["not shown", "50.0 [0.0, 100.0] (0 minus it)"]
    assert rows[1][2:4] == ["not shown", "50.0 [0.0, 100.0] (minus lora)"]
    assert all(row[4].startswith("tie, p = ") and row[4].endswith(", 2 seeds") for row in rows)
    assert all(float(row[4].split(", ")[1][4:]) >= benchmark.LEVEL for row in rows)
    # a row a seed ahead of the other is compared on the seeds both have
    for name in ("seed{}.json", "seed{}-items.json"):
        (benchmark.RESULTS / "toy" / "dirlora" / name.format(2)).write_text(
            (benchmark.RESULTS / "toy" / "dirlora" / name.format(0)).read_text())
    assert benchmark.claim_row(claims[0], gated, "page.md") == first


def test_sample_parameters_are_counted_by_hand_and_the_capacity_rows_match_the_others_nearest():
    # LoRA r 32 on q, k, v, o (128 x 128), gate, up (128 -> 384), down (384 -> 128), 2 layers:
    # 2 x (4 x 32 x 256 + 3 x 32 x 512) = 163,840. SMoLoRA: two experts of rank 32/8 = 4 a sample on gate, up,
    # down and the projector's two 128 x 128 linears, 8 x (2 x 3 x 512 + 2 x 256) = 28,672, and the fusion
    # vectors I_vu, I_if (out,) on each: 2 x 2 x (384 + 384 + 128) + 2 x (128 + 128) = 4,096
    count = benchmark.sample_parameters
    lora, smolora = count(("--method", "lora")), count(("--method", "smolora"))
    assert (lora, smolora) == (163_840, 28_672 + 4_096)
    per_rank = 2 * 3 * 512 + 2 * 256                   # one rank on SMoLoRA's linears
    flags = benchmark.EXPERIMENTS["capacity"][1]
    assert count(flags["lora r 9 on SMoLoRA's linears"]) == 9 * per_rank
    assert count(flags["smolora, experts of rank 22"]) == 22 * 2 * per_rank + 4_096
    assert all(abs(9 * per_rank - smolora) < abs(r * per_rank - smolora) for r in (8, 10))
    assert all(abs(22 * 2 * per_rank + 4_096 - lora) < abs(r * 2 * per_rank + 4_096 - lora) for r in (21, 23))


def fewshot_run(task, final, fresh, majority):
    """A run's results and items with one unseen task (VizWiz, 0 and 100) and one task k-shot tuned (k = 5)."""
    return ({"tasks": ["scienceqa"], "matrix": [[0], [50]], "fewshot": {task: {"5": {"majority": majority}}}},
            {"tasks": {"scienceqa": {"final": [50.0, 50.0], "follows": "11", "known": [1, 1]}},
             "unseen": {"vizwiz": [0.0, 100.0]}, "fewshot": {task: {"5": {"final": final, "fresh": fresh}}}})


def save_runs(root, experiment, row, runs):
    for seed, (results, items) in enumerate(runs):
        (root / experiment / row).mkdir(parents=True, exist_ok=True)
        (root / experiment / row / f"seed{seed}.json").write_text(json.dumps(results))
        (root / experiment / row / f"seed{seed}-items.json").write_text(json.dumps(items))


def test_few_shot_scores_from_final_and_fresh_adapters_and_the_majority_class(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "RESULTS", tmp_path)
    monkeypatch.setattr(benchmark, "EXPERIMENTS", {"toy": ((), {"lora": ("--method", "lora")})})
    save_runs(tmp_path, "toy", "lora", [fewshot_run("places365", [100.0, 100.0], [0.0, 100.0], 32.5)] * 2)
    header, _, lora, majority = benchmark.unseen_table("toy").splitlines()
    assert header == "| method | vizwiz | places365 5-shot | places365 5-shot, from fresh |"
    assert lora.startswith("| lora | 50.0 [0.0, 100.0] | 100.0 [100.0, 100.0] | 50.0 [")
    assert majority == "| majority class | – | 32.5 | 32.5 |"


def test_savings_are_relearning_from_the_final_adapters_minus_from_fresh_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "RESULTS", tmp_path)
    # ScienceQA relearned: from the final adapters 100 on both items, from fresh ones 0 and 100 -> savings 50
    save_runs(tmp_path, "savings", "lora", [fewshot_run("scienceqa", [100.0, 100.0], [0.0, 100.0], 50.0)] * 2)
    header, _, lora = benchmark.savings_table().splitlines()
    cells = [c.strip() for c in lora.split("|")[1:-1]]
    assert header.startswith("| method | seeds | final | 5-shot from final | 5-shot from fresh | savings |")
    assert cells[:5] == ["lora", "2", "50.0 [50.0, 50.0]", "100.0 [100.0, 100.0]", "50.0 [0.0, 100.0]"]
    assert cells[5].startswith("50.0 [0.0, 100.0]") and cells[6].startswith("tie, p ")


def test_the_budget_table_gives_each_task_right_after_learning_and_tests_each_row_against_the_budget(
        toy, tmp_path, monkeypatch):
    (tmp_path / "toy").rename(tmp_path / "budget")
    monkeypatch.setattr(benchmark, "EXPERIMENTS", {"budget": (("--tasks", "scienceqa,textvqa", "--method", "dirlora"),
                                                              {"lora": ("--epochs", "3"), "dirlora": ()})})
    monkeypatch.setattr(benchmark, "BUDGET", "dirlora")
    header, _, less, budget = benchmark.budget_table().splitlines()
    assert header == "| DirLoRA trained on | seeds | scienceqa | textvqa | minus the budget |"
    # right after learning, the toy's lora: ScienceQA (75 + 100) / 2, TextVQA (50 + 25) / 2; the budget's 100, 100;
    # the mean over the tasks minus the budget's: (-12.5 - 62.5) / 2
    cells = [c.strip() for c in less.split("|")[1:-1]]
    assert cells[:2] == ["lora", "2"] and [float(c.split(" [")[0]) for c in cells[2:]] == [87.5, 37.5, -37.5]
    assert cells[4].split("], ")[1].startswith(("better, p", "worse, p", "tie, p"))
    assert budget == "| dirlora (the budget) | 2 | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | – |"
    assert benchmark.rate_of("budget", "lora") == "dirlora"      # the rows' method is their experiment's
    # a row a seed ahead of the budget is tested against it on the seed both have run
    for name in ("seed1.json", "seed1-items.json"):
        (tmp_path / "budget" / "dirlora" / name).unlink()
    on_seed_0 = benchmark.compared(benchmark.difference(benchmark.items_of("budget", "lora", {0}),
                                                        benchmark.items_of("budget", "dirlora", {0}), "MFT"))
    assert benchmark.budget_table().splitlines()[2].endswith(f"| {on_seed_0} |")


def test_paired_rows_are_read_on_the_seeds_both_have_run_and_of_those_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "RESULTS", tmp_path)
    run = ({"tasks": ["scienceqa"]}, {"tasks": {}})
    save_runs(tmp_path, "toy", "a", [run] * 3)
    save_runs(tmp_path, "toy", "b", [run] * 3)
    (tmp_path / "toy" / "b" / "seed1.json").unlink()
    for seeds, count in ((None, 2), ((0, 1), 1), ((1,), 0)):
        a, b = benchmark.paired_items(("toy", "a"), ("toy", "b"), seeds)
        assert len(a) == len(b) == count


def test_the_picture_draws_the_tables_means_and_intervals(toy, tmp_path):
    run = benchmark.picture_run("toy", "lora")
    table_ap = benchmark.main_table("toy", {}).splitlines()[2].split(" | ")[3]        # "37.5 [low, high]"
    assert f"{run['metrics']['AP']:.1f} [{run['intervals']['AP'][0]:.1f}, {run['intervals']['AP'][1]:.1f}]" == table_ap
    # the mean matrix [[80, 0], [50, 60]]: MAP (80 + (50 + 60) / 2) / 2, forgetting 80 - 50
    assert (run["metrics"]["MAP"], run["metrics"]["forgetting"]) == (67.5, 30.0)
    plain = benchmark.eval._comparison_png([{**run, "intervals": {}}])
    assert benchmark.eval._comparison_png([run]) != plain            # the whiskers are drawn
