"""The results tables are what docs/results/ holds: the README's headline table and docs/results/README.md, remade
from those files, must match to the digit."""
import json
import re

import numpy as np
import pytest

import benchmark


def test_readme_table_is_made_from_docs_results():
    readme = benchmark.README.read_text()
    assert [m[1] for m in benchmark.BLOCK.findall(readme)] == ["coin"], "the README's headline table is its one block"
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
    return {"method": "lora", "tasks": ["scienceqa", "textvqa"], "seconds": seconds,
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
    assert header == ("| method | lr | AP | MFT | BWT | MIF | GK | format broke, knowledge kept | "
                      "format broke, knowledge lost | format held, wrong |")
    cells = [c.strip() for c in lora.split("|")[1:-1]]
    means = [float(c.split(" [")[0]) for c in cells[2:]]
    # AP: ScienceQA's final 25, 50 and TextVQA's 50, 25 -> 37.5; MFT (75 + 100) / 2 and 37.5 -> 62.5;
    # BWT: ScienceQA's final - after, -50 in both seeds; MIF: ScienceQA 1/4, 2/4, TextVQA all -> 68.75;
    # GK: (50 + 75) / 2 and (50 + 25) / 2 -> 50. The drop since learning, per item, seed 0: 100 on
    # items 0 (out of format, known: kept) and 3 (out of format, not known: lost); seed 1: 100 on
    # items 2 (lost) and 3 (kept) -> kept 25, lost 25, held 0
    assert cells[:2] == ["lora", "0.002"] and means == [37.5, 62.5, -50.0, 68.8, 50.0, 25.0, 25.0, 0.0]
    assert cells[-1] == "0.0 [0.0, 0.0]"
    low, high = map(float, cells[2].split(" [")[1].rstrip("]").split(", "))
    assert low < 37.5 < high
    assert dirlora.startswith("| dirlora | – | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] |")


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
    results = {"tasks": ["scienceqa", "textvqa"], "matrix": [[0, 0], [50, 0], [50, 50]],
               "unseen": {"tasks": ["vizwiz"]}}
    items = benchmark.test_items(tmp_path, results)
    # ScienceQA: right after learning A right, B wrong; at the end "It is B" (wrong, out of format,
    # knows B: not the answer) and "A"
    assert items["tasks"]["scienceqa"] == {"after": [100.0, 0.0], "final": [0.0, 100.0], "follows": "01",
                                           "known": [0.0, 1.0]}
    # TextVQA, learned last: right after learning is the end; a sentence is out of format but known
    assert items["tasks"]["textvqa"] == {"after": [100.0, 0.0], "final": [100.0, 0.0], "follows": "10",
                                         "known": [1.0, 1.0]}
    assert items["unseen"] == {"vizwiz": [0.0]} and items["fewshot"] == {}


def test_a_rate_chosen_at_an_edge_of_those_tried_brings_the_next_step_past_it():
    try_next = benchmark.rates_to_try
    assert try_next({}) == [1e-3, 2e-3, 5e-3]
    assert try_next({1e-3: 40, 2e-3: 50, 5e-3: 45}) == [1e-3, 2e-3, 5e-3]         # inside: done
    assert try_next({1e-3: 40, 2e-3: 50, 5e-3: 55}) == [1e-3, 2e-3, 5e-3, 1e-2]   # the top edge
    assert try_next({1e-3: 40, 2e-3: 50, 5e-3: 55, 1e-2: 54}) == [1e-3, 2e-3, 5e-3, 1e-2]
    assert try_next({1e-3: 60, 2e-3: 50, 5e-3: 40, 5e-4: 61, 2e-4: 62}) == [2e-4, 5e-4, 1e-3, 2e-3, 5e-3]
    assert try_next({1e-3: 40, 2e-3: 50, 5e-3: 55, 1e-2: 56, 2e-2: 57}) == [1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
    assert benchmark.best_rate({1e-3: 50, 2e-3: 50}) == 1e-3                       # a tie: the lower
