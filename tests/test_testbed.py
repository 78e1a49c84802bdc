"""The testbed's premises, as docs/testbed.md and the README's "The tiny base model and the synthetic data" state them: the
tiny base knows the scenes and answers what is asked in free sentences, but not in the tasks' formats, and
every task can be learned. Measured afresh on the base every run uses (built once into the cache if it is
not there, as the tutorial's test does), and on the committed profile docs/testbed.md shows."""
import json

import pytest
import torch

import base_profile
import data
import locating
import rank_rule
import smolora


TESTBED = base_profile.ROOT / "docs" / "testbed.md"      # the measured testbed, the README's summary links it


@pytest.fixture(scope="module")
def base():
    return smolora.load_model(smolora.ensure_tiny_model(smolora.CACHE, progress=False))


def has_the_papers_shape(profile, asked_at_least):
    """GK well above the score (over the tasks scored in percent, not CIDEr), few answers in the
    asked format, what is asked answered."""
    tasks = profile["tasks"]
    percent = [row for t, row in tasks.items() if data.TASKS[t].scorer != "cider"]
    mean = {m: sum(row[m] for row in percent) / len(percent) for m in ("score", "GK")}
    formats = [t for t in tasks if data.TASKS[t].answer_kind in ("letter", "bbox")]
    assert mean["GK"] >= mean["score"] + 25, mean
    assert all(tasks[t]["MIF"] <= 10 and tasks[t]["score"] <= 10 for t in formats), formats
    assert profile["asked"] >= asked_at_least


def test_the_base_has_the_papers_profile(base):
    model, processor = base
    asked, _ = base_profile.asked_share(model, processor, pairs=20)
    has_the_papers_shape({"tasks": base_profile.zero_shot(model, processor, 10), "asked": asked},
                         asked_at_least=60)


def test_the_committed_profile_has_it_and_says_which_tasks_are_learned():
    """docs/testbed.md names the tasks DirLoRA does not learn to 80% of their ceiling (the premise the
    testbed does not yet hold), and the README's summary says how many."""
    profile = json.loads(base_profile.RESULT.read_text())
    assert (profile["model"], profile["synthetic"]) == (smolora.TINY_MODEL, data.SYNTHETIC_VERSION), \
        "the profile is of another base or other data: run python tests/base_profile.py --dirlora"
    has_the_papers_shape(profile, asked_at_least=70)
    short = [task for task, row in profile["tasks"].items()
             if max(row["dirlora"].values()) < 0.8 * base_profile.ceiling(task)]
    page = TESTBED.read_text()
    assert f"DirLoRA learns {len(short)} of the {len(profile['tasks'])} tasks to less than 80%" in page
    assert all(task in page.split("to less than 80%")[1].split(".")[0] for task in short)
    learned = len(profile["tasks"]) - len(short)
    assert f"learns {learned} of the {len(profile['tasks'])} tasks to at least 80%" in " ".join(
        (base_profile.ROOT / "README.md").read_text().split())


def test_the_testbed_page_shows_the_committed_profile():
    table = base_profile.profile_table(json.loads(base_profile.RESULT.read_text()))
    assert table in TESTBED.read_text(), "docs/testbed.md's profile table differs from docs/results/base-profile.json"


def test_the_testbed_page_shows_the_rank_rule_and_the_default_follows_it():
    result = json.loads(rank_rule.RESULT.read_text())
    assert rank_rule.rule_table(result) in TESTBED.read_text(), \
        "docs/testbed.md's rank table differs from docs/results/rank-rule.json"
    assert result["model"] == smolora.TINY_MODEL, "the rule was measured on another base"
    # the default is the r the rule chose, or where no r met it, the r that came nearest: the one where
    # the lowest share of LoRA's score, over the methods and tasks, is highest
    nearest = max(rank_rule.RANKS, key=lambda r: min(
        result["scores"][str(r)][m][t] / result["scores"][str(r)]["lora"][t]
        for m in rank_rule.METHODS for t in data.COIN_TASKS))
    r = rank_rule.chosen(result["scores"]) or nearest
    assert (smolora.Config(tasks=["scienceqa"]).r, smolora.Config(tasks=["scienceqa"]).alpha) == (r, 2 * r)


def test_the_testbed_page_shows_where_the_place_goes_missing():
    result = json.loads(locating.RESULT.read_text())
    assert (result["model"], result["synthetic"]) == (smolora.TINY_MODEL, data.SYNTHETIC_VERSION), \
        "the experiment is of another base or other data: run python tests/locating.py"
    assert locating.locating_table(result) in TESTBED.read_text(), \
        "docs/testbed.md's locating tables differ from docs/results/locating.json"


def test_stage1_leaves_the_language_model_as_stage0_left_it(tmp_path):
    """Stage 1 trains the vision tower and the projector alone; with stage1_trains_llm (the experiment of
    tests/locating.py) the language model too. Two stage-1 steps from the seed's initial weights."""
    torch.manual_seed(0)
    initial = smolora.build_tiny_model(data.build_processor())     # pretrain_tiny_model's, seed 0
    for trains in (False, True):
        path = smolora.pretrain_tiny_model(tmp_path / str(trains), steps=(0, 2), progress=False,
                                           stage1_trains_llm=trains)
        model, _ = smolora.load_model(path)
        moved = {name: not all(torch.equal(a, b) for a, b in zip(part(initial).parameters(),
                                                                 part(model).parameters()))
                 for name, part in (("llm", lambda m: m.model.language_model),
                                    ("vision", lambda m: m.model.vision_tower),
                                    ("projector", lambda m: m.model.multi_modal_projector))}
        assert moved == {"llm": trains, "vision": True, "projector": True}
