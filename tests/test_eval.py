"""eval.py against hand-computed values: scorers, MIF, continual metrics, CIDEr-D, the report and
the CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

import eval as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- normalisation and VQA accuracy

@pytest.mark.parametrize("raw, normalised", [
    ("Two.", "2"), ("2", "2"), ("the dog", "dog"), ("Dog", "dog"), ("A Dog!", "dog"),
    ("dont", "don't"), ("he'dve", "he'd've"), ("1,000", "1000"), ("2.5", "2.5"),
    ("yes, it is", "yes it is"), ("red-white", "red white"),
    ("  none\n", "0"), ("an apple", "apple"),
])
def test_normalize_answer(raw, normalised):
    assert E.normalize_answer(raw) == normalised


def test_exact_match_uses_normalisation():
    assert E.score("gqa", "Two.", "2") == 1.0
    assert E.score("gqa", "the dog", "dog") == 1.0
    assert E.score("gqa", "DOG", "dog") == 1.0
    assert E.score("gqa", "dogs", "dog") == 0.0
    assert E.score("gqa", "", "") == 0.0  # an empty prediction is wrong everywhere
    # CoIN's OCR-VQA quirk is not copied
    assert E.score("ocrvqa", "unanswerable", "Unanswerable") == 1.0
    assert E.score("vizwiz", "Unanswerable.", "unanswerable") == 1.0


def test_vqa_accuracy_with_ten_answers():
    # k of 10 humans agree; leave each human out: the k subsets without a matching human have k-1
    # matches, the 10-k others have k; accuracy = (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10
    others = ["cat"] * 10
    # k=1: (1*0 + 9*(1/3)) / 10 = 3/10
    assert E.vqa_accuracy("dog", ["dog"] + others[:9]) == 0.3
    # k=2: (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
    assert E.vqa_accuracy("dog", ["dog"] * 2 + others[:8]) == pytest.approx(0.6)
    # k=3: (3*(2/3) + 7*1) / 10 = 9/10
    assert E.vqa_accuracy("dog", ["dog"] * 3 + others[:7]) == pytest.approx(0.9)
    # k=4: (4*1 + 6*1) / 10 = 1
    assert E.vqa_accuracy("dog", ["dog"] * 4 + others[:6]) == 1.0
    assert E.vqa_accuracy("dog", others) == 0.0
    # normalised on both sides: "Two" among "2"s
    assert E.vqa_accuracy("Two.", ["2"] * 3 + others[:7]) == pytest.approx(0.9)
    assert E.vqa_accuracy("", [""] * 10) == 0.0
    assert E.score("textvqa", "the dog", ["dog"] * 2 + others[:8]) == pytest.approx(0.6)
    assert E.score("vqav2", "dog", "dog") == 1.0  # one answer: exact match


def test_imagenet_exact_or_contained():
    assert E.score("imagenet", "golden retriever", "golden retriever") == 1.0
    assert E.score("imagenet", "a golden retriever dog", "golden retriever") == 1.0
    assert E.score("imagenet", "Golden Retriever.", "golden retriever") == 1.0
    assert E.score("imagenet", "cat", "caterpillar") == 0.0
    assert E.score("imagenet", "caterpillar", "cat") == 0.0  # whole words only
    assert E.score("imagenet", "", "cat") == 0.0  # CoIN counts an empty prediction correct


# ---------------------------------------------------------------- letters

@pytest.mark.parametrize("prediction", [
    "B", "B.", "(B)", "B)", " B ", "B. blue", "(B) blue", "The answer is B",
    "I think the answer is B.", "Option B", "b", "b.", "(b)", "b) blue", "the answer is b."])
def test_parse_letter_variants(prediction):
    assert E.parse_letter(prediction) == "B"
    assert E.score("scienceqa", prediction, "B") == 1.0
    assert E.score("scienceqa", prediction, "A") == 0.0


def test_parse_letter_failures_and_options():
    assert E.parse_letter("blue") is None
    assert E.parse_letter("") is None
    assert E.parse_letter("the answer is a circle") is None   # an article, not option A
    assert E.parse_letter("it is a red one") is None
    assert E.parse_letter("a") == "A" and E.parse_letter("a. red") == "A"   # marked as an option
    assert E.parse_letter("E", n_options=4) is None
    assert E.parse_letter("D", n_options=4) == "D"
    assert E.score("scienceqa", "[0.1, 0.2, 0.3, 0.4]", "A") == 0.0


# ---------------------------------------------------------------- boxes

@pytest.mark.parametrize("text, box", [
    ("[0.1,0.2,0.3,0.4]", [0.1, 0.2, 0.3, 0.4]),
    ("[0.1, 0.2, 0.3, 0.4]", [0.1, 0.2, 0.3, 0.4]),
    ("[ 0.123 , 0.2345 ,0.3, 0.45678 ]", [0.123, 0.2345, 0.3, 0.45678]),
    ("The box is [0, .5, 1, 1.0].", [0.0, 0.5, 1.0, 1.0]),
    ("[0.12, 0.34, 0.56, 0.78] and [0.9, 0.9, 1, 1]", [0.12, 0.34, 0.56, 0.78]),  # the first box
])
def test_parse_bbox(text, box):
    assert E.parse_bbox(text) == pytest.approx(box)


@pytest.mark.parametrize("text", ["", "0.1, 0.2, 0.3, 0.4", "[0.1, 0.2, 0.3]", "[a, b, c, d]", "B"])
def test_parse_bbox_rejects(text):
    assert E.parse_bbox(text) is None


def test_iou_and_grounding_threshold():
    assert E.iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert E.iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    # [0,0,2,2] and [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7
    assert E.iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    # half of the ground truth: intersection 0.5, union 1 -> IoU exactly 0.5, wrong (> 0.5 needed)
    assert E.iou([0, 0, 0.5, 1], [0, 0, 1, 1]) == 0.5
    assert E.score("grounding", "[0, 0, 0.5, 1]", [0, 0, 1, 1]) == 0.0
    # 0.51 / 1 just above
    assert E.score("grounding", "[0, 0, 0.51, 1]", [0, 0, 1, 1]) == 1.0
    # the answer as text works too
    assert E.score("grounding", "[0.0,0.0,0.51,1.0]", "[0, 0, 1, 1]") == 1.0
    # every digit counts: CoIN's parser would read y2 = 0.9 from 0.95 here
    assert E.score("grounding", "[0.1, 0.1, 0.5, 0.95]", [0.1, 0.1, 0.5, 0.95]) == 1.0
    assert E.score("grounding", "no box", [0, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="not a box"):
        E.score("grounding", "[0, 0, 1, 1]", "nothing")


# ---------------------------------------------------------------- CIDEr-D

def test_cider_two_image_corpus_by_hand():
    # image 1: reference "a red circle", candidate "a red red circle"; image 2: "a blue square"
    # both. idf = log(2 images) - log(images whose refs have the n-gram): "a" is in both -> 0;
    # every other n-gram (also those in no reference) -> log 2 =: L.
    # image 1, n=1: cand {a:0, red:2L, circle:L}, ref {a:0, red:L, circle:L}
    #   clipped dot = min(2L,L)*L + L*L = 2L^2; |cand| = sqrt(5) L, |ref| = sqrt(2) L -> 2/sqrt(10)
    #   (without clipping it would be 3/sqrt(10))
    # n=2: cand {a red, red red, red circle} (all L), ref {a red, red circle}
    #   -> 2L^2 / (sqrt3 L sqrt2 L) = 2/sqrt(6)
    # n=3: {a red red, red red circle} vs {a red circle} -> 0;  n=4: the reference has none -> 0
    # length penalty: 4 vs 3 words -> exp(-1 / (2 * 6^2)) = exp(-1/72)
    image1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 2 / math.sqrt(6) + 0 + 0) / 4
    # image 2: identical; n=1..3 cosine 1, n=4 0 (3 words) -> 10 * 3/4
    image2 = 7.5
    got = E.cider(["a red red circle", "A blue square."], [["a red circle"], ["a blue square"]])
    assert got == pytest.approx((image1 + image2) / 2)  # 5.53621
    assert E.task_score("flickr30k", ["a red red circle", "a blue square"],
                        [["a red circle"], "a blue square"]) \
        == pytest.approx(100 * (image1 + image2) / 2)


def test_cider_averages_over_references():
    # image 1 has two references; the candidate equals the first and shares nothing weighted with
    # the second. idf: "a" (in both images' refs) 0; everything else log 2. vs ref 1 "a red circle":
    # 3/4 as above; vs ref 2 "green": no shared n-gram -> 0; length 3 vs 1 irrelevant.
    # image 1 = 10 * (3/4 + 0) / 2
    got = E.cider(["a red circle", "a blue square"], [["a red circle", "green"], ["a blue square"]])
    assert got == pytest.approx((10 * 0.75 / 2 + 7.5) / 2)


def test_caption_score_per_sample():
    # uniform weights: an exact copy of a 3-word reference has cosine 1 for n = 1..3 and no 4-grams:
    # 3/4
    assert E.score("flickr30k", "a red circle", "a red circle") == pytest.approx(0.75)
    assert E.score("textcaps", "a big red circle here .",
                   ["a big red circle here"]) == pytest.approx(1.0)
    assert E.score("flickr30k", "", ["a red circle"]) == 0.0
    assert 0.0 < E.score("flickr30k", "a red square", ["a red circle"]) < 0.75


# ---------------------------------------------------------------- instruction following

@pytest.mark.parametrize("task, prediction, follows", [
    ("scienceqa", "B", True), ("scienceqa", "b", True), ("scienceqa", " C ", True),
    ("scienceqa", "B.", False),                          # SMoLoRA's check: exactly one letter
    ("scienceqa", "B. blue", False), ("scienceqa", "[0.1, 0.2, 0.3, 0.4]", False),
    ("scienceqa", "", False),
    ("gqa", "dog", True), ("gqa", "red car", True), ("gqa", "a red car", False), ("gqa", "", False),
    ("vizwiz", "Unanswerable", True),
    ("imagenet", "[0.1, 0.2, 0.3, 0.4]", False),  # a box is 4 words
    ("grounding", "[0.1, 0.2, 0.3, 0.4]", True), ("grounding", "[0.1,0.2,0.3,0.4]", True),
    ("grounding", "[0.1, 0.2, 0.3, 1.4]", False), ("grounding", "box [0.1, 0.2, 0.3, 0.4]", False),
    ("grounding", "A", False),
    ("flickr30k", "A red circle on the grass.", True),
    ("flickr30k", "A red circle on grass", False),
    ("flickr30k", "Red circle on grass.", False),
])
def test_follows_instruction(task, prediction, follows):
    assert E.follows_instruction(task, prediction) is follows


def test_follows_instruction_phrase_equal_to_truth():
    assert not E.follows_instruction("textvqa", "the big red car")
    assert E.follows_instruction("textvqa", "the big red car", answer=["big red car"] * 10)
    assert not E.follows_instruction("textvqa", "the big red car", answer="blue car")


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="unknown task 'mnist'.*scienceqa"):
        E.score("mnist", "1", "1")
    with pytest.raises(ValueError, match="unknown task"):
        E.follows_instruction("mnist", "1")


def test_task_score_percent_and_errors():
    assert E.task_score("scienceqa", ["A", "B", "(C)", "D"], ["A", "B", "C", "A"]) == 75.0
    with pytest.raises(ValueError, match="2 predictions and 1 answers"):
        E.task_score("gqa", ["a", "b"], ["a"])
    with pytest.raises(ValueError):
        E.task_score("gqa", [], [])


def test_majority_score_answers_every_item_with_the_answer_most_items_accept():
    assert E.majority_score("places365", ["grid", "grid", "stripes", "dots"]) == 50.0
    # "bus" is accepted by 2 items, "cat" and "hat" by 1: 1, then 2 of 10 humans (VQA: the mean over the 10
    # leave-one-out sets of min(1, matches / 3): 2 sets 1/3, 8 sets 2/3, 0.6), then 0
    answers = [["bus"] * 10, ["bus"] * 2 + ["cat"] * 8, ["hat"] * 10]
    assert E.majority_score("textvqa", answers) == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    assert E.majority_score("flickr30k", ["A dog runs."]) is None and E.majority_score("grounding", [[0, 0, 1, 1]]) is None


def test_item_scores_are_each_items_part_of_the_task_score():
    assert E.item_scores("scienceqa", ["A", "B", "(C)", "D"], ["A", "B", "C", "A"]) == [100, 100, 100, 0]
    # the caption pair of test_cider_matches_hand_computed_value: image 1 10 e^(-1/72) (2/sqrt 10
    # + 2/sqrt 6) / 4, image 2 7.5, each x 100 (the task's percent) beside the corpus's idf
    image1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 2 / math.sqrt(6)) / 4
    got = E.item_scores("flickr30k", ["a red red circle", "a blue square"],
                        [["a red circle"], "a blue square"])
    assert got == pytest.approx([100 * image1, 750.0])
    # VQA: "two" matches 2 of the 10 human answers: of the 10 sets of 9, 2 hold one match (1/3),
    # 8 hold two (2/3): (2/3 + 16/3) / 10 = 0.6; their mean is the task score
    answers = [["two"] * 2 + ["three"] * 8, ["red"] * 10]
    assert E.item_scores("vqav2", ["two", "blue"], answers) == pytest.approx([60.0, 0.0])
    assert sum(E.item_scores("vqav2", ["two", "blue"], answers)) / 2 == pytest.approx(
        E.task_score("vqav2", ["two", "blue"], answers))
    with pytest.raises(ValueError, match="2 predictions and 1 answers"):
        E.item_scores("gqa", ["a", "b"], ["a"])


# ---------------------------------------------------------------- continual metrics

def test_continual_metrics_by_hand():
    A = [[80, 10, 20],   # after stage 1
         [85, 70, 45],   # after stage 2
         [50, 40, 90]]   # after stage 3
    zero_shot = [5, 15, 25]
    m = E.continual_metrics(A, zero_shot)
    assert m["AP"] == pytest.approx((50 + 40 + 90) / 3)                     # 60
    assert m["MFT"] == pytest.approx((80 + 70 + 90) / 3)                    # 80
    # (80 + 77.5 + 60) / 3 = 72.5
    assert m["MAP"] == pytest.approx((80 / 1 + (85 + 70) / 2 + 180 / 3) / 3)
    assert m["BWT"] == pytest.approx(((50 - 80) + (40 - 70)) / 2)           # -30
    # 32.5: task 1's best was 85
    assert m["forgetting"] == pytest.approx(((85 - 50) + (70 - 40)) / 2)
    assert m["FWT"] == pytest.approx(((10 - 15) + (45 - 25)) / 2)           # 7.5
    assert E.continual_metrics(A)["FWT"] is None


def test_forgetting_counts_only_the_scores_since_a_task_was_learned():
    A = [[80, 90, 0],    # task 2 already scores 90 before it is learned (stage 1)
         [70, 50, 0],    # learned at stage 2: 50
         [60, 40, 90]]
    # ours: max over i <= t < T: ((80 - 60) + (50 - 40)) / 2 = 15; a max over all t < T would give
    # ((80 - 60) + (90 - 40)) / 2 = 35, charging task 2 with a score it had before it was learned
    assert E.continual_metrics(A)["forgetting"] == pytest.approx(15.0)


def test_continual_metrics_edge_cases():
    assert E.continual_metrics([[42.0]]) == {"AP": 42.0, "MFT": 42.0, "MAP": 42.0, "BWT": None,
                                             "forgetting": None, "FWT": None}
    # only the lower triangle evaluated (CoIN's way): all but FWT
    m = E.continual_metrics([[80, None], [60, 70]], zero_shot=[0, 0])
    assert (m["AP"], m["BWT"], m["FWT"]) == (65, -20, None)
    for bad, message in [([], "non-empty"), ([[1, 2], [3]], "ragged"), ([[1, 2, 3]], "square"),
                         ([[1, float("nan")], [1, 2]], "is nan"), ([[None, 1], [1, 2]], "None"),
                         ([[]], "ragged")]:
        with pytest.raises(ValueError, match=message):
            E.continual_metrics(bad)
    with pytest.raises(ValueError, match="zero_shot has 1"):
        E.continual_metrics([[1, 2], [3, 4]], zero_shot=[1])


# ---------------------------------------------------------------- report and CLI

TASKS2 = ["scienceqa", "gqa"]


def test_write_report_files(tmp_path):
    results = {"method": "smolora", "tasks": TASKS2, "config": {"seed": 0}, "seconds": 12.5,
               "matrix": [[10.0, 20.0], [90.0, 30.0], [70.0, 80.0]],
               "mif": [[50.0, 40.0], [100.0, 60.0], [95.0, 100.0]]}
    E.write_report(tmp_path, results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["matrix"] == results["matrix"] and saved["config"] == {"seed": 0}
    assert saved["metrics"] == pytest.approx({
        "AP": 75.0, "MFT": 85.0, "MAP": (90 + 75) / 2, "BWT": -20.0, "forgetting": 20.0,
        "FWT": 10.0, "MIF": 97.5, "GK": None})
    md = (tmp_path / "matrix.md").read_text()
    assert ("| after gqa | 70.00 | 80.00 |" in md and "| zero-shot | 50.00 | 40.00 |" in md
            and "97.50" in md)
    with Image.open(tmp_path / "matrix.png") as png:
        png.load()
        assert png.format == "PNG" and png.width > 200 and png.height > 200
    # no temporary files left
    assert sorted(os.listdir(tmp_path)) == ["matrix.md", "matrix.png", "results.json"]


def test_write_report_partial_run(tmp_path):
    results = {"method": "lora", "tasks": TASKS2, "config": {}, "seconds": None,
               "matrix": [[10.0, 20.0], [90.0, None]], "mif": [[50.0, 40.0], [100.0, None]]}
    E.write_report(tmp_path, results)
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] \
        == dict.fromkeys(E.METRICS)
    assert "| after scienceqa | 90.00 | – |" in (tmp_path / "matrix.md").read_text()
    Image.open(tmp_path / "matrix.png").load()
    for bad, message in [([[1.0, 2.0], [1.0]], "ragged"), ([[1.0, float("nan")]], "is nan"),
                         ([], "non-empty"), ([[1.0]], "2 tasks")]:
        with pytest.raises(ValueError, match=message):
            E.write_report(tmp_path, {**results, "matrix": bad})


def _run_folder(tmp_path):
    """A finished 2-task run: results.json with stale numbers, and predictions for stages 0-2."""
    run = tmp_path / "run"
    texts = {  # (scienceqa predictions, gqa predictions) per stage; answers are A, B / dog, cat
        0: (["A", "the answer is C"], ["dog", "a big grey cat"]),
        1: (["A", "B"], ["[0.1, 0.2, 0.3, 0.4]", "dog"]),
        2: (["A", "C"], ["Dog.", "cat"]),
    }
    for stage, (sqa, gqa) in texts.items():
        for task, preds, answers in (("scienceqa", sqa, ["A", "B"]), ("gqa", gqa, ["dog", "cat"])):
            E.save_predictions(run / "predictions" / f"stage{stage}" / f"{task}.jsonl", [
                {"question_id": f"{task}-{k}", "prompt": "q", "text": p, "answer": a}
                for k, (p, a) in enumerate(zip(preds, answers))])
    (run / "results.json").write_text(json.dumps({
        "method": "lora", "tasks": TASKS2, "config": {"lr": 1}, "matrix": [[0, 0]], "mif": [[0, 0]],
        "seconds": 3.0}))
    return run


def test_rescore_run_by_hand(tmp_path):
    run = _run_folder(tmp_path)
    results = E.rescore_run(run)
    # stage 0: sqa A right, C wrong -> 50; gqa dog right, "a big grey cat" wrong -> 50
    # stage 1: sqa 100; gqa: 0 (a box, and "dog" for cat); stage 2: sqa 50, gqa 100
    assert results["matrix"] == [[50.0, 50.0], [100.0, 0.0], [50.0, 100.0]]
    # MIF: stage 0 sqa "A" yes, "the answer is C" no -> 50; gqa "dog" yes, 4 words no -> 50
    # stage 1: sqa 100; gqa the box (4 words: instruction-following forgetting) no, "dog" yes -> 50
    # stage 2: 100, 100
    assert results["mif"] == [[50.0, 50.0], [100.0, 50.0], [100.0, 100.0]]
    assert results["metrics"]["AP"] == 75.0 and results["metrics"]["BWT"] == -50.0
    assert results["metrics"]["FWT"] == -50.0  # (A[1][2] - A[0][2]) = 0 - 50
    saved = json.loads((run / "results.json").read_text())
    assert (saved["config"], saved["seconds"], saved["matrix"]) \
        == ({"lr": 1}, 3.0, results["matrix"])


def test_rescore_run_bad_predictions(tmp_path):
    run = _run_folder(tmp_path)
    (run / "predictions" / "stage2" / "gqa.jsonl").write_text("")
    with pytest.raises(ValueError, match="stage2.gqa.jsonl is empty"):
        E.rescore_run(run)
    (run / "predictions" / "stage2" / "gqa.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="gqa.jsonl:1: not a JSON line"):
        E.rescore_run(run)


def test_cli_rescores_and_rejects_a_bad_folder(tmp_path, capsys):
    run = _run_folder(tmp_path)
    E.main([str(run)])  # in-process: the subprocess below shows the command line itself
    assert "| after gqa | 50.00 | 100.00 |" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text())["matrix"][2] == [50.0, 100.0]
    bad = subprocess.run([sys.executable, "eval.py", str(tmp_path / "nowhere")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "results.json not found" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_predictions_round_trip(tmp_path):
    predictions = [{"question_id": 7, "prompt": "q\ninstr", "text": "B", "answer": "B"},
                   {"question_id": "x", "prompt": "p", "text": "[0.1, 0.2, 0.3, 0.4]",
                    "answer": [0, 0, 1, 1]}]
    E.save_predictions(tmp_path / "sub" / "p.jsonl", predictions)
    assert E.load_predictions(tmp_path / "sub" / "p.jsonl") == predictions


# ---------------------------------------------------------------- generation on a tiny random model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-layer, width-32 LlavaForConditionalGeneration with random weights around
    data.build_processor(), and 5 synthetic scienceqa test records."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)
    import data
    torch.manual_seed(0)
    processor = data.build_processor()
    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=data.IMAGE_SIZE,
                              patch_size=data.PATCH)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    root = str(tmp_path_factory.mktemp("data"))
    data.make_synthetic(root, ["scienceqa"], n_train=1, n_test=5, seed=0, progress=False)
    return model, processor, root, data.load_records(root, "scienceqa", "test")


def test_generate_predictions_one_per_record(tiny):
    model, processor, _, records = tiny
    seen = []
    model.train()
    predictions = E.generate_predictions(model, processor, records, "scienceqa", batch_size=2,
                                         before_generate=lambda batch: seen.append(batch))
    assert model.training  # the caller's mode comes back
    assert [p["question_id"] for p in predictions] == [r["id"] for r in records]
    assert [p["answer"] for p in predictions] == [r["answer"] for r in records]
    assert [p["prompt"] for p in predictions] == [r["text"] for r in records]
    assert all(isinstance(p["text"], str) and p["text"] == p["text"].strip() for p in predictions)
    assert [len(b["input_ids"]) for b in seen] == [2, 2, 1] and all("ins_mask" in b for b in seen)
    # greedy and left-padded: a record's answer does not depend on what it was batched with
    alone = E.generate_predictions(model, processor, records[:3], "scienceqa", batch_size=1)
    assert [p["text"] for p in alone] == [p["text"] for p in predictions[:3]]


def test_generate_predictions_answers_text_alone(tiny):
    """Records without an image, as the base's stage 0 reads a scene (tests/locating.py): the answer is
    the model's own greedy continuation of the prompt "USER: {text} ASSISTANT:"."""
    model, processor, _, records = tiny
    texts = [dict(r, image=None) for r in records[:2]]
    predictions = E.generate_predictions(model, processor, texts, "scienceqa", batch_size=2)
    tok = processor.tokenizer
    for record, prediction in zip(texts, predictions):
        ids = tok(f"USER: {record['text']} ASSISTANT:", return_tensors="pt")
        out = model.generate(**ids, do_sample=False, max_new_tokens=E.MAX_NEW_TOKENS["letter"],
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        alone = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert prediction["text"] == alone


def test_rescore_checks_question_ids_against_the_test_records(tiny, tmp_path):
    model, processor, root, records = tiny
    predictions = E.generate_predictions(model, processor, records, "scienceqa", batch_size=5)
    run = tmp_path / "run"
    (run / "predictions" / "stage1").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "method": "lora", "tasks": ["scienceqa"], "config": {"data": root}, "matrix": [[None]],
        "mif": [[None]], "seconds": 1.0}))
    E.save_predictions(run / "predictions" / "stage1" / "scienceqa.jsonl", predictions)
    expected = E.task_score("scienceqa", [p["text"] for p in predictions],
                            [r["answer"] for r in records])
    assert E.rescore_run(run)["matrix"] == [[None], [expected]]
    E.save_predictions(run / "predictions" / "stage1" / "scienceqa.jsonl", predictions[:4])
    with pytest.raises(ValueError,
                       match="question ids do not match the 5 test records of scienceqa"):
        E.rescore_run(run)


# ---------------------------------------------------------------- SMoLoRA's routing report

# two samples of a, one of b; two layers; each pick is [VU expert, IF expert]
PICKS = {"a": [[[0, 1], [2, 0]], [[1, 1], [2, 0]]], "b": [[[0, 1], [3, 1]]]}


def test_routing_overlap_by_hand():
    # VU, layer 1: a half on 0, half on 1; b on 0 -> a.b = 0.5, a.a = 0.5.
    # Layer 2: a on 2, b on 3 -> 0; a.a = 1
    assert sum(E.routing_overlap(PICKS, 0), []) == pytest.approx([75.0, 25.0, 25.0, 100.0])
    # IF: layer 1 all on 1 -> 1; layer 2 a on 0, b on 1 -> 0
    assert sum(E.routing_overlap(PICKS, 1), []) == pytest.approx([100.0, 50.0, 50.0, 100.0])


def test_write_routing_files(tmp_path):
    E.write_routing(tmp_path, "smolora", PICKS, pool_size=4)
    md = (tmp_path / "routing.md").read_text()
    assert ("| a | 75.00 | 25.00 |" in md and "| b | 50.00 | 100.00 |" in md
            and "2 SMoLoRA layers" in md)
    with Image.open(tmp_path / "routing.png") as png:
        png.load()
        assert png.format == "PNG" and png.width > 200
    assert sorted(os.listdir(tmp_path)) == ["routing.md", "routing.png"]
