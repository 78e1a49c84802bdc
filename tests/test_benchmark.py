"""The results tables are what docs/results/ holds: the README's headline table and docs/results/README.md, remade
from those files, must match to the digit."""
import json
import re

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


def results(ap, gk, drops, diagonal, seconds=60.0):
    """A two-task run's results.json with the metrics and splits a table reads."""
    return {"method": "lora", "tasks": ["scienceqa", "textvqa"], "seconds": seconds,
            "matrix": [[0, 0], [diagonal[0], 0], [50, diagonal[1]]],
            "metrics": {"AP": ap, "MFT": 80.0, "MAP": 70.0, "BWT": -30.0, "MIF": 90.0, "GK": gk},
            "dual_forgetting": {"scienceqa": dict(zip(benchmark.eval.SPLIT, drops))}}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A toy experiment of two rows and two seeds in a docs/results of its own."""
    monkeypatch.setattr(benchmark, "RESULTS", tmp_path)
    monkeypatch.setattr(benchmark, "EXPERIMENTS", {"toy": ((), {"lora": ("--method", "lora"),
                                                                "dirlora": ("--method", "dirlora")})})
    runs = {"lora": [results(10.0, 40.0, (20, 5, 5), (90, 60)), results(20.0, 50.0, (10, 5, 15), (70, 60))],
            "dirlora": [results(30.0, 60.0, (0, 0, 0), (80, 100)), results(30.0, 60.0, (0, 0, 0), (80, 100))]}
    for row, seeds in runs.items():
        (tmp_path / "toy" / row).mkdir(parents=True)
        for k, r in enumerate(seeds):
            (tmp_path / "toy" / row / f"seed{k}.json").write_text(json.dumps(r))


def test_a_table_is_the_mean_and_sample_std_over_the_seeds(toy):
    lines = benchmark.main_table("toy", {"lora": (2e-3, {})}).splitlines()
    # AP 10, 20: mean 15, sample std sqrt(((10-15)^2 + (20-15)^2) / 1) = 7.07; format broke/kept 20, 10 -> 15 ± 7.1
    assert lines[2] == "| lora | 0.002 | 15.0 ± 7.1 | 80.0 ± 0.0 | 70.0 ± 0.0 | -30.0 ± 0.0 | 90.0 ± 0.0 | " \
                       "45.0 ± 7.1 | 15.0 ± 7.1 | 5.0 ± 0.0 | 10.0 ± 7.1 |"
    assert lines[3].startswith("| dirlora | – | 30.0 ± 0.0 |")


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
