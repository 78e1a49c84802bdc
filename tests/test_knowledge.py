"""Knowledge, CoIN's second axis: the rule judge per answer kind, the three-way dual-forgetting
split, the report's knowledge panel and GK, and the LLM judge (CoIN's prompt, our parser, a tiny
random causal LM end to end)."""
import json
import random

import pytest
import torch
from PIL import Image

import data
import eval as E

SQA_PROMPT = ("Which shape is in the image?\nOptions:\nA. circle\nB. square\nC. triangle\nD. star\n"
              + data.TASKS["scienceqa"].instruction)
BOX = [0.25, 0.5, 0.75, 1.0]
CAPTION = "A red house is to the left of a blue car."  # content words: red, house, left, blue, car


# ---------------------------------------------------------------- the rule judge, by hand

# (task, prediction, answer, prompt, knowledge, follows the format): every kind has a right answer
# in the wrong format (judged right) and a wrong answer in the right format (judged wrong)
CASES = [
    ("scienceqa", "B", "B", SQA_PROMPT, 1.0, True),
    ("scienceqa", "square", "B", SQA_PROMPT, 1.0, False),      # by the option's text
    ("scienceqa", "The answer is (B) square.", "B", SQA_PROMPT, 1.0, False),
    ("scienceqa", "A square", "B", SQA_PROMPT, 1.0, False),    # "A" before a word: the article
    ("scienceqa", "(b) square", "B", SQA_PROMPT, 1.0, False),  # a marked letter in either case
    ("scienceqa", "b", "B", SQA_PROMPT, 1.0, True),
    ("scienceqa", "C", "B", SQA_PROMPT, 0.0, True),
    ("scienceqa", "B or C", "B", SQA_PROMPT, 0.0, False),      # names another option too
    ("scienceqa", "a square and a circle", "B", SQA_PROMPT, 0.0, False),
    ("scienceqa", "A. circle", "A", SQA_PROMPT, 1.0, False),   # "A." is the letter
    ("scienceqa", "I think B", "B", SQA_PROMPT, 1.0, False),   # "I" is no option of this prompt
    ("scienceqa", "", "B", SQA_PROMPT, 0.0, False),
    ("gqa", "red", "red", "", 1.0, True),
    ("gqa", "The shape is red.", "red", "", 1.0, False),
    ("gqa", "blue", "red", "", 0.0, True),
    ("gqa", "reddish", "red", "", 0.0, True),                               # whole words only
    ("imagenet", "a red car", "car", "", 1.0, False),
    ("vizwiz", "It is unanswerable.", "unanswerable", "", 1.0, False),
    # 2 of 10 humans said "sun": each left out in turn, (2 x 1/3 + 8 x 2/3) / 10 = 0.6
    ("textvqa", "The sign says SUN", ["sun"] * 2 + ["sup"] * 8, "", 0.6, False),
    ("textvqa", "SUP", ["sun"] * 2 + ["sup"] * 8, "", 1.0, True),
    ("grounding", "[0.25, 0.50, 0.75, 1.00]", BOX, "", 1.0, True),
    ("grounding", "the red circle is at (0.25, 0.5, 0.75, 1.0)", BOX, "", 1.0, False),
    ("grounding", "[0.25, 0.50, 0.75, 0.90]", BOX, "", 1.0, True),          # IoU 0.2 / 0.25 = 0.8
    ("grounding", "[0.00, 0.00, 0.25, 0.25]", BOX, "", 0.0, True),
    ("grounding", "red circle [0.25, 0.50, 0.75, 1.00], blue star [0.00, 0.00, 0.50, 0.50]",
     BOX, "", 0.0, False),
    ("grounding", "red circle", BOX, "", 0.0, False),
    ("flickr30k", CAPTION, CAPTION, "", 1.0, True),
    ("flickr30k", "red house, blue car, left", CAPTION, "", 1.0, False),
    ("flickr30k", "A green tree is above a pink fish.", CAPTION, "", 0.0, True),
    # red, house, left: 3 of the 5 content words
    ("flickr30k", "A red house is to the left of a green tree.", CAPTION, "", 0.6, True),
    ("textcaps", "SUN", "A red sign that says SUN.", "", 1 / 3, False),  # of red, sign, sun
    # a number as a digit or a word, either way round
    ("vqav2", "There are two circles.", ["2"] * 10, "", 1.0, False),
    ("vqav2", "two", ["2"] * 8 + ["3"] * 2, "", 1.0, True),
    ("vqav2", "2", ["two"] * 10, "", 1.0, True),
    ("vqav2", "There are three circles.", ["2"] * 10, "", 0.0, False),
    ("scienceqa", "The shape is a square.", "B", SQA_PROMPT, 1.0, False),
]


def test_every_answer_the_data_write_is_known_in_each_of_its_forms():
    """The task's answer, the base's sentence and its brief answer (a count as a word or a digit,
    an option's text for its letter, a box inside a sentence) all carry the content."""
    for name in data.TASKS:
        rng = random.Random(name)
        for _ in range(40):
            s = data.draw(name, rng, "test")
            prompt = data.compose_text(data.TASKS[name], s.question)
            for form in (s.answer, s.sentence, s.brief):
                assert E.knowledge(name, form, s.answer, prompt) == 1.0, (name, form, s.answer)


@pytest.mark.parametrize("task, prediction, answer, prompt, known, follows", CASES)
def test_knowledge_by_hand(task, prediction, answer, prompt, known, follows):
    assert E.knowledge(task, prediction, answer, prompt) == pytest.approx(known)
    assert E.follows_instruction(task, prediction, answer) == follows


def test_every_task_has_a_knowledge_rule():
    assert {data.TASKS[case[0]].answer_kind for case in CASES} \
        == {task.answer_kind for task in data.TASKS.values()}


# ---------------------------------------------------------------- the three-way split

def test_dual_forgetting_three_ways_by_hand():
    answers = ["A", "B", "C", "D"]
    before = [{"question_id": i, "prompt": SQA_PROMPT, "text": a, "answer": a}
              for i, a in enumerate(answers)]
    after = [{"question_id": i, "prompt": SQA_PROMPT, "text": t, "answer": a}
             for i, (t, a) in enumerate(zip(["A", "square", "[0.1, 0.2, 0.3, 0.4]", "A"], answers))]
    # 0 kept; 1 wrong by the letter scorer, out of format, names B's text: knowledge kept; 2 out of
    # format, no option named: knowledge lost; 3 in format and wrong: format held. 25 points each of
    # 4 samples.
    split = E.dual_forgetting("scienceqa", before, after)
    assert split == {"drop": 75.0, "format_broke_knowledge_kept": 25.0,
                     "format_broke_knowledge_lost": 25.0, "format_held": 25.0}
    # an LLM judge's scores / 10 weigh each broken-format sample: 1 -> 5 kept + 20 lost,
    # 2 -> 15 + 10
    split = E.dual_forgetting("scienceqa", before, after, known=[0.0, 0.2, 0.6, 1.0])
    assert split == pytest.approx({"drop": 75.0, "format_broke_knowledge_kept": 20.0,
                                   "format_broke_knowledge_lost": 30.0, "format_held": 25.0})
    assert sum(split[k] for k in E.SPLIT) == pytest.approx(split["drop"])
    assert split["drop"] == E.task_score("scienceqa", answers, answers) - E.task_score(
        "scienceqa", [p["text"] for p in after], answers)


# ---------------------------------------------------------------- the report, on an old run

def old_run(tmp_path):
    """A finished scienceqa -> gqa run as written before knowledge existed: no "knowledge" in
    results.json."""
    run = tmp_path / "run"
    texts = {0: (["square", "I don't know"], ["The shape is red.", "blue"]),
             1: (["B", "C"], ["blue", "square"]),
             2: (["square", "D"], ["red", "circle"])}
    for stage, (sqa, gqa) in texts.items():
        for task, preds, answers, prompt in (
                ("scienceqa", sqa, ["B", "C"], SQA_PROMPT),
                ("gqa", gqa, ["red", "circle"], "What color is it?\n" + data.PHRASE)):
            E.save_predictions(run / "predictions" / f"stage{stage}" / f"{task}.jsonl", [
                {"question_id": f"{task}-{k}", "prompt": prompt, "text": p, "answer": a}
                for k, (p, a) in enumerate(zip(preds, answers))])
    (run / "results.json").write_text(json.dumps({
        "method": "lora", "tasks": ["scienceqa", "gqa"], "config": {}, "matrix": [[0, 0]],
        "mif": [[0, 0]], "seconds": 3.0}))
    return run


def test_rescoring_an_old_run_adds_knowledge_gk_and_the_split(tmp_path, capsys):
    run = old_run(tmp_path)
    E.main([str(run)])
    saved = json.loads((run / "results.json").read_text())
    assert saved["matrix"] == [[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]]
    # stage 0: "square" names B, "I don't know" nothing; "The shape is red." knows red, "blue" not
    # stage 1: B, C right; blue, square wrong. stage 2: "square" knows B, "D" wrong; red, circle
    # right
    assert saved["knowledge"] == [[50.0, 50.0], [100.0, 0.0], [50.0, 100.0]]
    assert saved["metrics"]["GK"] == 75.0 and "knowledge_judge" not in saved
    # scienceqa 100 -> 0: "square" broke the format knowing B (50), "D" kept it and is wrong (50)
    assert saved["dual_forgetting"] == {"scienceqa": {
        "drop": 100.0, "format_broke_knowledge_kept": 50.0, "format_broke_knowledge_lost": 0.0,
        "format_held": 50.0}}
    md = (run / "matrix.md").read_text()
    assert "## Knowledge (%, whatever the format; rule judge)" in md
    assert ("| after gqa | 50.00 | 100.00 |" in md
            and "| scienceqa | 100.00 | 50.00 | 0.00 | 50.00 |" in md)
    assert "## Knowledge" in capsys.readouterr().out
    with Image.open(run / "matrix.png") as png:
        png.load()
        assert png.height > 3 * 30 * 5      # three panels of 5 rows (title, columns, 3 stages)


def test_comparison_carries_gk_and_the_split(tmp_path):
    results = E.rescore_run(old_run(tmp_path))
    E.write_comparison(tmp_path, [results, {**results, "method": "other"}])
    md = (tmp_path / "compare.md").read_text()
    assert "| GK | format_broke_knowledge_kept | format_broke_knowledge_lost | format_held |" in md
    assert ("| lora | 50.00 | 75.00 | -100.00 | 100.00 | 75.00 | 75.00 | 50.00 | 0.00 | 50.00 | – |"
            in md)
    assert "| lora | 50.0 / 0.0 / 50.0 |" in md
    Image.open(tmp_path / "compare.png").load()


# ---------------------------------------------------------------- the LLM judge: prompt and parser

@pytest.mark.parametrize("reply, score", [
    ("8", 8.0), ("8/10", 8.0), ("7.5", 7.5), ("10/10", 10.0), ("0", 0.0), ("", 0.0), ("none", 0.0),
    ("Score: 10", 10.0),                       # CoIN: the first digit, 1
    ("15, no, 6", 6.0),                        # CoIN: 1
    ("-3", 0.0),                               # CoIN: float("-3") = -3
    ("The assistant deserves 9 points out of 10.", 9.0),
])
def test_parse_judge_score(reply, score):
    assert E.parse_judge_score(reply) == score


SYSTEM_TEXT = ("[System]\nWe would like to request your feedback on the performance of an AI "
               "assistants in response to the user question displayed above.\nPlease rate the "
               "accuracy of its responses according to the ground truth answer displayed above. "
               "The assistant receives an overall score on a scale of 0 to 10, where a higher "
               "score indicates better overall performance.\nPlease output a single line "
               "containing only a values indicating the scores for the Assistant.")


def test_judge_messages_are_coins_prompt_without_the_instruction():
    vizwiz = {"prompt": "What color is this?\n" + data.TASKS["vizwiz"].instruction,
              "text": "It is too dark.", "answer": "unanswerable"}
    system, user = E.judge_messages("vizwiz", vizwiz)
    assert system == {"role": "system", "content": E.JUDGE_SYSTEM}
    assert user == {"role": "user", "content": (
        "[Context]\n[Question]\nWhat color is this?\n\n[Ground truth answer]\nunanswerable\n\n"
        "[End of ground truth answer]\n\n[Assistant]\nIt is too dark.\n\n[End of Assistant]\n\n"
        + SYSTEM_TEXT)}
    grounding = {"prompt": data.compose_text(data.TASKS["grounding"], "the red circle."),
                 "text": "[0.1, 0.2, 0.3, 0.4]", "answer": BOX}
    assert "[Question]\nthe red circle.\n\n[Ground truth answer]\n[0.25, 0.50, 0.75, 1.00]\n" in (
        E.judge_messages("grounding", grounding)[1]["content"])
    textvqa = {"prompt": "What does the sign say?\n" + data.PHRASE, "text": "SUN",
               "answer": ["sup"] * 3 + ["sun"] * 7}
    assert "[Ground truth answer]\nsun\n" in E.judge_messages("textvqa", textvqa)[1]["content"]
    sqa = E.judge_messages("scienceqa",
                           {"prompt": SQA_PROMPT, "text": "B", "answer": "B"})[1]["content"]
    assert "D. star\n\n[Ground truth answer]\nB\n" in sqa and "letter" not in sqa


# ---------------------------------------------------------------- the LLM judge end to end

@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    """A 1-layer, width-32 LlamaForCausalLM with random weights, data.build_processor()'s tokenizer
    with a chat template, saved as a checkpoint folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tokenizer = data.build_processor().tokenizer
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024,
                         initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("judge")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_llm_judge_end_to_end(tiny_judge, tmp_path, monkeypatch):
    run = old_run(tmp_path)
    E.main([str(run), "--judge", tiny_judge, "--device", "cpu"])
    saved = json.loads((run / "results.json").read_text())
    assert saved["knowledge_judge"] == tiny_judge
    assert "## Knowledge (%, whatever the format; LLM judge " in (run / "matrix.md").read_text()
    cache = E.load_predictions(run / "predictions" / "stage2" / "gqa.judge.jsonl")
    assert [(c["question_id"], c["text"], c["judge"]) for c in cache] \
        == [("gqa-0", "red", tiny_judge), ("gqa-1", "circle", tiny_judge)]
    assert saved["knowledge"][2][1] \
        == pytest.approx(10 * sum(E.parse_judge_score(c["reply"]) for c in cache) / 2)
    # a reply judged alone, with no padding, is the one judged in a batch
    model, tokenizer = E.load_judge(tiny_judge)
    prediction = E.load_predictions(run / "predictions" / "stage2" / "gqa.jsonl")[1]
    text = tokenizer.apply_chat_template(E.judge_messages("gqa", prediction),
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    alone = model.generate(**ids, do_sample=False, max_new_tokens=20,
                           pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(alone[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) \
        == cache[1]["reply"]

    # a rerun loads no model; a changed prediction alone is judged again
    def no_model(*args):
        raise AssertionError("the judge was loaded although every prediction is cached")
    monkeypatch.setattr(E, "load_judge", no_model)
    assert E.rescore_run(run, tiny_judge)["knowledge"] == saved["knowledge"]
    # the cached replies are what is scored: hand-written ones give knowledge
    # (8 + 10) / 2 x 10 = 90, and weigh the split: "square" (format broken) judged 3 -> 0.3 x 50
    # kept, 0.7 x 50 lost
    for task, replies in (("gqa", ["8", "Score: 10"]), ("scienceqa", ["3", "I'd say 0."])):
        path = run / "predictions" / "stage2" / f"{task}.judge.jsonl"
        E.save_predictions(path, [{**c, "reply": r}
                                  for c, r in zip(E.load_predictions(path), replies)])
    results = E.rescore_run(run, tiny_judge)
    assert results["knowledge"][2] == [15.0, 90.0] and results["metrics"]["GK"] == 52.5
    assert results["dual_forgetting"]["scienceqa"] == pytest.approx({
        "drop": 100.0, "format_broke_knowledge_kept": 15.0, "format_broke_knowledge_lost": 35.0,
        "format_held": 50.0})
    monkeypatch.undo()
    changed = E.load_predictions(run / "predictions" / "stage1" / "scienceqa.jsonl")
    changed[0]["text"] = "circle"
    E.save_predictions(run / "predictions" / "stage1" / "scienceqa.jsonl", changed)
    judged, replies = [], E.judge_replies
    monkeypatch.setattr(E, "judge_replies", lambda model, tok, chats, **kw:
                        judged.extend(chats) or replies(model, tok, chats, **kw))
    E.rescore_run(run, tiny_judge)
    assert len(judged) == 1 and "[Assistant]\ncircle\n" in judged[0][1]["content"]
    # without --judge, the rule judge again
    assert ("knowledge_judge" not in E.rescore_run(run)
            and E.rescore_run(run)["knowledge"][0] == [50.0, 50.0])


def test_judge_errors_are_one_line(tmp_path, capsys):
    run = old_run(tmp_path)
    for flags, message in [(["--judge", str(tmp_path / "nowhere")], "cannot load a causal LM"),
                           (["--dtype", "int8"], "--dtype 'int8' is not allowed")]:
        with pytest.raises(SystemExit) as exit_:
            E.main([str(run), *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
