"""Evaluation, in reading order:
- the scorers: answers normalised as the official VQA evaluation does, option letters, boxes,
  CIDEr-D by hand, and `score` / `task_score` for one sample and one task;
- instruction following, SMoLoRA's MIF (`follows_instruction`);
- knowledge whatever the format, CoIN's second axis: the rule judge `knowledge`, CoIN's LLM judge;
- the continual metrics: `continual_metrics`, `run_metrics`, `dual_forgetting`, `routing_overlap`;
- generation: batched greedy decoding (`generate_predictions`), predictions saved as jsonl;
- the reports and pictures: a run's results.json, matrix.md and matrix.png (`write_report`),
  re-scoring a run (`rescore_run`), the comparison of methods (compare.md, compare.png) and
  SMoLoRA's routing (routing.md, routing.png);
- the command line: `python eval.py RUN_DIR [--judge MODEL]` re-scores a run's saved predictions
  and rewrites its report, so a scorer fix never needs retraining.
The official code's quirks are not copied: an empty prediction is wrong everywhere, no digit of a
box is dropped, and matching is never case-sensitive.
"""
import argparse
import io
import json
import math
import os
import re
import string
import sys
import tempfile
from collections import Counter
from itertools import accumulate

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import data


_task = data.get_task  # the task's row of data.TASKS, or a one-line error naming the known ones


def _as_list(answer):
    """One answer or several: a string becomes a one-element list."""
    return [answer] if isinstance(answer, str) else list(answer)


# ----------------------------------------------------------------------------------------------
# Scorers: answers normalised as the official VQA evaluation (vqaEval.py) does, letters, boxes.

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # each character is a mark
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# The canonical forms of the official contraction table; it maps each form written with all, or all
# but one, of its apostrophes left out back to the form ("dont" -> "don't", "he'dve" -> "he'd've").
# ours: "i'd've", "i'm", "i've" in lower case (the official keys are capitalised, so never match
# lowered text).
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
hadn't've hasn't haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've
it'll let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't
'ow's'at shan't she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've
'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all
y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
CONTRACTIONS = {form.replace("'", ""): form for form in CONTRACTED}
CONTRACTIONS |= {form[:i] + form[i + 1:]: form
                 for form in CONTRACTED for i, c in enumerate(form) if c == "'"}


def normalize_answer(s):
    """The VQA answer normalisation: lower case, punctuation, articles, number words -> digits,
    contractions: "Two." -> "2", "The dog" -> "dog", "dont" -> "don't", "1,000" -> "1000", "2.5"
    stays "2.5"."""
    text = s.replace("\n", " ").replace("\t", " ").strip()
    # a mark touching a space, or any text with a thousands comma, loses the mark; elsewhere it
    # splits words
    original, glued = text, re.search(r"\d,\d", text) is not None
    for mark in PUNCTUATION:
        touches_space = mark + " " in original or " " + mark in original
        text = text.replace(mark, "" if touches_space or glued else " ")
    # a period not followed by a digit (the official regex, in effect)
    text = re.sub(r"\.(?!\d)", "", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _contains(text, phrase):
    """Whether the normalised phrase occurs as whole words in the normalised text."""
    phrase = normalize_answer(phrase)
    return bool(phrase) and f" {phrase} " in f" {normalize_answer(text)} "


def vqa_accuracy(prediction, answers):
    """VQA soft accuracy: min(#humans that gave the prediction / 3, 1), averaged over the
    10-choose-9 subsets. With k of the 10 humans agreeing that is

        (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10

    so 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1. One answer (a string or a one-element list)
    scores by normalised exact match."""
    predicted = normalize_answer(prediction)
    return _human_agreement([bool(predicted) and normalize_answer(a) == predicted
                             for a in _as_list(answers)])


def _human_agreement(hits):
    """VQA's soft accuracy from hits[k], whether human k's answer matches; one answer: 1 if it
    matches, else 0."""
    if len(hits) <= 1:
        return float(any(hits))
    # leave each human out in turn; min(matches among the others, 3) / 3, summed in integers so
    # 1 -> 9/30 = 0.3
    return sum(min(sum(hits) - hit, 3) for hit in hits) / (3 * len(hits))


def _marked_letter(text):
    """The match of a letter marked as an option, either case: the whole text ("B", "b.", "(B)",
    "B)") or its start ("B. blue", "(b) blue"); else None."""
    return re.fullmatch(r"\(?([A-Za-z])[.):]?", text) or re.match(r"\(?([A-Za-z])[.):]\s", text)


def parse_letter(prediction, n_options=None):
    """The option letter (upper case) in a multiple-choice answer, or None. Tried in order: the
    whole output is a letter ("B", "b", "B.", "(B)", "B)"); it starts with one ("B. blue",
    "(b) blue"); "answer is B" (LLaVA's ScienceQA pattern: "I think the answer is B" is B,
    "answer is b." too); else the first one-character word that is a capital letter ("Option B").
    Case does not matter where the letter stands marked as an option (CoIN's scorer upper-cases);
    inside a sentence only a capital counts, so the article in "the answer is a circle" is not
    option A. With n_options only the first n_options letters count."""
    letters = string.ascii_uppercase[:n_options] if n_options else string.ascii_uppercase
    text = prediction.strip()
    found = _marked_letter(text) or re.search(r"answer is \(?([A-Z]\b|[a-z](?=[.):]|\s*$))", text)
    if found and found.group(1).upper() in letters:
        return found.group(1).upper()
    for word in text.split():
        word = word.strip("()[].,:;!?'\"")
        if len(word) == 1 and word in letters:
            return word
    return None


NUMBER = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
BOX = re.compile(r"\[" + ",".join([NUMBER] * 4) + r"\]")


def parse_bbox(text):
    """The first "[x1, y1, x2, y2]" in the text as 4 floats, or None; spaces and any number of
    digits allowed."""
    match = BOX.search(text)
    return [float(v) for v in match.groups()] if match else None


def _truth_box(answer):
    """A ground-truth box given as text ("[x1, y1, x2, y2]", parsed; None if it is not one) or as
    numbers."""
    return parse_bbox(answer) if isinstance(answer, str) else answer


def iou(box_a, box_b):
    """Intersection over union of two [x1, y1, x2, y2] boxes; 0 when the union is empty."""
    def area(b):
        return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]),
                  min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# CIDEr-D, by hand, as the COCO caption code (pycocoevalcap ciderD) computes it.

CIDER_N = 4
CIDER_SIGMA = 6.0


def _caption_ngrams(sentence):
    """n-gram counts, n = 1..4, and the length in words. ours: lower case and words of letters,
    digits and inner apostrophes stand in for the COCO code's Java PTB tokenizer (which also
    lower-cases and drops punctuation)."""
    words = re.findall(r"\w+(?:'\w+)*", sentence.lower())
    grams = Counter(tuple(words[i:i + n])
                    for n in range(1, CIDER_N + 1) for i in range(len(words) - n + 1))
    return grams, len(words)


def _cider_d_per_image(predictions, references, use_idf=True):
    """CIDEr-D of each prediction against its references, before the COCO code's x10 (each value in
    [0, 1]). idf(g) = log(#images) - log(max(1, #images whose references contain g)); with
    use_idf=False every n-gram weighs 1 (a plain tf cosine), which a one-image corpus needs: there
    every idf is log 1 - log 1 = 0."""
    cands = [_caption_ngrams(p) for p in predictions]
    refs = [[_caption_ngrams(r) for r in image_refs] for image_refs in references]
    doc_freq = Counter(g for image_refs in refs
                       for g in set().union(*(grams for grams, _ in image_refs)))
    log_images = math.log(len(refs))

    def vector(grams):  # tf-idf per n, and each n's norm
        vec = [{} for _ in range(CIDER_N)]
        for g, tf in grams.items():
            idf = log_images - math.log(max(1.0, doc_freq[g])) if use_idf else 1.0
            vec[len(g) - 1][g] = tf * idf
        return vec, [math.sqrt(sum(v * v for v in vn.values())) for vn in vec]

    scores = []
    for (cand, cand_len), image_refs in zip(cands, refs):
        vec_c, norm_c = vector(cand)
        total = 0.0
        for ref, ref_len in image_refs:
            vec_r, norm_r = vector(ref)
            # Gaussian length penalty; the COCO code measures length in bigrams, which for non-empty
            # sentences gives the same difference
            penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * CIDER_SIGMA ** 2))
            for n in range(CIDER_N):
                # clipping: a candidate n-gram counts at most as often as the reference has it
                dot = sum(min(v, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0)
                          for g, v in vec_c[n].items())
                if norm_c[n] > 0 and norm_r[n] > 0:
                    # the penalised cosine, averaged over n = 1..4
                    total += penalty * dot / (norm_c[n] * norm_r[n]) / CIDER_N
        scores.append(total / len(image_refs))  # mean over the references
    return scores


def cider(predictions, references):
    """Corpus CIDEr-D as the COCO caption code reports it (x10, mean over images): predictions[i]
    is scored against references[i] (a list of strings), with document frequencies over all the
    references given."""
    if not predictions or len(predictions) != len(references) or not all(references):
        raise ValueError(f"cider needs as many non-empty reference lists as predictions, got "
                         f"{len(predictions)} predictions and {len(references)} reference lists")
    return 10.0 * sum(_cider_d_per_image(predictions, references)) / len(predictions)


# ----------------------------------------------------------------------------------------------
# Scoring one sample and one task.

def score(task, prediction, answer):
    """The score in [0, 1] of one prediction, by the task's scorer in data.TASKS (CoIN's and
    SMoLoRA's per-task metrics); answer: the option letter, a string or a list of (10) strings, or
    a box ([x1, y1, x2, y2] or its text). Caption tasks: CIDEr-D of the pair with every n-gram
    weighing 1, without the x10 (an exact copy of a single 4+ word reference scores 1). ours: a
    one-image corpus would give idf = 0 to every n-gram, so always 0; the task-level number,
    task_score, is the corpus CIDEr-D."""
    scorer = _task(task).scorer
    if scorer == "letter":
        return float(parse_letter(prediction) == answer.strip())
    if scorer == "vqa":
        return vqa_accuracy(prediction, answer)
    if scorer == "exact":
        predicted = normalize_answer(prediction)
        truths = [normalize_answer(a) for a in _as_list(answer)]
        return float(bool(predicted) and predicted in truths)
    if scorer == "contains":
        # ours: contained as whole words ("cats" does not contain "cat"); CoIN takes any
        # case-sensitive substring
        return float(any(_contains(prediction, a) for a in _as_list(answer)))
    if scorer == "iou":
        truth = _truth_box(answer)
        if truth is None or len(truth) != 4:
            raise ValueError(f"grounding answer {answer!r} is not a box [x1, y1, x2, y2]")
        box = parse_bbox(prediction)
        return float(box is not None and iou(box, truth) > 0.5)  # exactly 0.5 is wrong
    return _cider_d_per_image([prediction], [_as_list(answer)], use_idf=False)[0]


def _check_pairs(task, predictions, answers):
    if not predictions or len(predictions) != len(answers):
        raise ValueError(f"{task}: {len(predictions)} predictions and {len(answers)} answers; "
                         f"need as many, at least 1")


def task_score(task, predictions, answers):
    """The task's score in percent: the mean of `score` x 100, or the corpus CIDEr-D x 100 for
    captions (so a caption task is on the papers' scale, e.g. 110.5, and may exceed 100)."""
    _check_pairs(task, predictions, answers)
    if _task(task).scorer == "cider":
        return 100.0 * cider(predictions, [_as_list(a) for a in answers])
    return 100.0 * sum(score(task, p, a) for p, a in zip(predictions, answers)) / len(predictions)


def item_scores(task, predictions, answers):
    """Each prediction's part of task_score, in its units (their mean is task_score, to rounding):
    `score` x 100, or for captions its CIDEr-D x 1000 within the corpus (document frequencies over
    all the references given). What a bootstrap over test items resamples."""
    _check_pairs(task, predictions, answers)
    if _task(task).scorer == "cider":
        return [1000.0 * v for v in _cider_d_per_image(predictions, [_as_list(a) for a in answers])]
    return [100.0 * score(task, p, a) for p, a in zip(predictions, answers)]


def majority_score(task, answers):
    """task_score of answering every item with the majority class: the answer string that the most
    items accept (each counts an item once). What a few-shot score is read against. None for
    captions and boxes, which have no classes."""
    if _task(task).answer_kind not in ("letter", "phrase"):
        return None
    votes = Counter(a for answer in answers for a in set(_as_list(answer)))
    return task_score(task, [votes.most_common(1)[0][0]] * len(answers), answers)


# ----------------------------------------------------------------------------------------------
# Instruction following: does the answer have the format its instruction asks for (SMoLoRA's MIF).

def follows_instruction(task, prediction, answer=None):
    """Whether the output has the FORMAT the task's instruction asks for, whatever its content
    (SMoLoRA's MIF).
    letter: exactly one letter, either case, as SMoLoRA's check (`strip().upper()` in the options):
    "B." does not comply, the instruction asks for the letter "directly";
    phrase: 1 or 2 words, or equal (normalised) to the ground truth when `answer` is given;
    bbox: only "[x1, y1, x2, y2]" with 4 numbers in [0, 1];
    caption: a sentence of more than 4 words ending with "."."""
    kind = _task(task).answer_kind
    text = prediction.strip()
    if kind == "letter":
        return re.fullmatch(r"[A-Za-z]", text) is not None
    if kind == "phrase":
        is_truth = (answer is not None
                    and normalize_answer(text) in [normalize_answer(a) for a in _as_list(answer)])
        return 1 <= len(text.split()) <= 2 or (bool(text) and is_truth)
    if kind == "bbox":
        box = BOX.fullmatch(text)
        return box is not None and all(0.0 <= float(v) <= 1.0 for v in box.groups())
    return len(text.split()) > 4 and text.endswith(".")


def score_predictions(task, predictions):
    """(score, MIF) in percent of a list of saved predictions ({"question_id", "prompt", "text",
    "answer"})."""
    texts, answers = [p["text"] for p in predictions], [p["answer"] for p in predictions]
    follows = sum(follows_instruction(task, t, a) for t, a in zip(texts, answers))
    return task_score(task, texts, answers), 100.0 * follows / len(predictions)


# ----------------------------------------------------------------------------------------------
# Knowledge, CoIN's second axis: is the content right, whatever its format? Rules, or an LLM judge.

STOP_WORDS = set("a an the is are was were be of to in on at by for with and or that this it its "
                 "there says".split())
ANY_BOX = re.compile(r"[\[(]" + ",".join([NUMBER] * 4) + r"[\])]")


def knowledge(task, prediction, answer, prompt=""):
    """Whether the prediction's CONTENT is right, whatever its format: a rule judge in [0, 1].
    letter: it names the right option and no other, by letter (a capital standing alone, or either
    case as the whole answer or marked at its start: "B", "it is B", "b", "(b) circle") or by the
    option's text (the prompt's "A. circle" lines); a capital "A" before a lower-case word is the
    article.
    phrase: the normalised ground truth occurs as whole words in the normalised prediction
    ("The sign says SUN." knows "sun"); with several human answers, VQA soft accuracy with that
    match in place of equality.
    bbox: the text holds a box ("[x1, y1, x2, y2]", or in parentheses) and every box in it has
    IoU > 0.5 with the truth: a list of every object's box does not know which one was asked for.
    caption: the share of a reference's content words (all but STOP_WORDS) in the prediction, the
    best reference's."""
    kind = _task(task).answer_kind
    if kind == "letter":
        options = dict(re.findall(r"^\(?([A-Z])[.)] *(.+?) *$", prompt, re.M))
        text = prediction.strip()
        marked = _marked_letter(text)
        named = {m.group(1) for m in re.finditer(r"\b([A-Z])\b", text)
                 if not re.match(r"A [a-z]", text[m.start():])}
        named |= {marked.group(1).upper()} if marked else set()
        named &= set(options or string.ascii_uppercase)
        named |= {k for k, option in options.items() if _contains(prediction, option)}
        return float(named == {answer.strip()})
    if kind == "phrase":
        return _human_agreement([_contains(prediction, a) for a in _as_list(answer)])
    if kind == "bbox":
        truth = _truth_box(answer)
        boxes = [[float(v) for v in m.groups()] for m in ANY_BOX.finditer(prediction)]
        return float(bool(boxes) and all(iou(box, truth) > 0.5 for box in boxes))
    said = set(re.findall(r"\w+", prediction.lower()))
    wanted = [set(re.findall(r"\w+", r.lower())) - STOP_WORDS for r in _as_list(answer)]
    return max((len(words & said) / len(words) for words in wanted if words), default=0.0)


# CoIN's LLM judge, its prompt word for word; it sees no image. ours, not CoIN's quirks: greedy
# decoding (CoIN samples: temperature 0.7, top_p 0.8); the question is the prompt less its
# instruction (data.find_instruction; CoIN drops the last line, emptying grounding's question and
# keeping VizWiz's first instruction line); the system message CoIN wrote (its run overwrote it
# with "You are a helpful assistant.").
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_PROMPT = (
    "[Context]\n[Question]\n{question}\n\n[Ground truth answer]\n{answer}\n\n"
    "[End of ground truth answer]\n\n[Assistant]\n{prediction}\n\n[End of Assistant]\n\n"
    "[System]\nWe would like to request your feedback on the performance of an AI assistants in "
    "response to the user question displayed above.\nPlease rate the accuracy of its responses "
    "according to the ground truth answer displayed above. The assistant receives an overall score "
    "on a scale of 0 to 10, where a higher score indicates better overall performance.\nPlease "
    "output a single line containing only a values indicating the scores for the Assistant.")


def parse_judge_score(reply):
    """The judge's score: the first number in [0, 10] in its reply, else 0 (unparseable counts 0,
    as in CoIN). ours: CoIN reads float(reply), else the part before "/", else the first DIGIT 1-9
    anywhere: "Score: 10" reads 1, "-3" reads -3, "15, no, 6" reads 1. Here "Score: 10" is 10, and
    numbers outside [0, 10] are skipped."""
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", reply)]
    return next((n for n in numbers if 0 <= n <= 10), 0.0)


def judge_messages(task, prediction):
    """CoIN's judge chat for one saved prediction {"prompt", "text", "answer"}."""
    prompt, answer = prediction.get("prompt", ""), prediction["answer"]
    start, end = data.find_instruction(_task(task), prompt)
    if not isinstance(answer, str) and _task(task).answer_kind == "bbox":
        answer = data.format_box(answer)
    elif not isinstance(answer, str):  # 10 human answers: the one most of them gave
        answer = Counter(answer).most_common(1)[0][0]
    user = JUDGE_PROMPT.format(question=(prompt[:start] + prompt[end:]).strip(), answer=answer,
                               prediction=prediction["text"])
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def load_judge(name, device="cpu", dtype="float32"):
    """A causal LM (a folder or hub id) and its tokenizer, padding on the left: judge_replies'."""
    try:
        # left: the replies start at the same column
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype)).to(device)
    except (OSError, ValueError) as e:
        raise ValueError(f"--judge {name!r}: cannot load a causal LM and its tokenizer "
                         f"({str(e).splitlines()[0]})") from None
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.eval(), tokenizer


def judge_replies(model, tokenizer, chats, batch_size=16, desc="judging"):
    """The judge's greedy replies (at most 20 new tokens, as CoIN's) to chats, in order, batched."""
    replies = []
    for start in tqdm(range(0, len(chats), batch_size), desc=desc, unit="batch"):
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in chats[start:start + batch_size]]
        batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        batch = batch.to(model.device)
        output = model.generate(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"], do_sample=False,
                                max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
        replies += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                          skip_special_tokens=True)
    return replies


def _reply_key(prediction):
    """What the judge's reply to a saved prediction is cached under: its question and its text."""
    return str(prediction["question_id"]), prediction["text"]


def _judge_cache(path):
    """Where the LLM judge's replies to the predictions at path are cached: beside them."""
    return path[:-len(".jsonl")] + ".judge.jsonl"


def _cached_replies(path, judge):
    """{_reply_key: reply} of the LLM `judge` to the predictions at path, from its cache."""
    cache = _judge_cache(path)
    cached = load_predictions(cache) if os.path.isfile(cache) else []
    return {_reply_key(c): c["reply"] for c in cached if c.get("judge") == judge}


def knowledge_of(task, predictions):
    """Each saved prediction's knowledge by the rule judge, as GK counts it."""
    return [knowledge(task, p["text"], p["answer"], p.get("prompt", "")) for p in predictions]


def _sample_knowledge(task, predictions, path=None, judge=None):
    """Each prediction's knowledge in [0, 1]: the rule judge's, or the LLM judge's cached
    score / 10."""
    if judge is None:
        return knowledge_of(task, predictions)
    replies = _cached_replies(path, judge)
    if any(_reply_key(p) not in replies for p in predictions):
        raise ValueError(f"{path}: some predictions are not judged by {judge}; "
                         f"run: eval.py RUN_DIR --judge {judge}")
    return [parse_judge_score(replies[_reply_key(p)]) / 10 for p in predictions]


# ----------------------------------------------------------------------------------------------
# Continual metrics: the papers' over a run's matrix, dual forgetting, routing overlap.

def _check_matrix(matrix, name):
    """A non-empty list of equally long rows, each cell a finite number or None (not evaluated)."""
    listed = isinstance(matrix, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in matrix)
    if not listed or not matrix:
        raise ValueError(f"{name} must be a non-empty list of rows, got {matrix!r}")
    if not matrix[0] or any(len(row) != len(matrix[0]) for row in matrix):
        raise ValueError(f"{name} is ragged or empty: row lengths {[len(r) for r in matrix]}")
    for t, row in enumerate(matrix):
        for i, cell in enumerate(row):
            if cell is not None and not (isinstance(cell, (int, float)) and math.isfinite(cell)):
                raise ValueError(f"{name}[{t}][{i}] is {cell!r}; "
                                 f"a cell must be a finite number or None")


def continual_metrics(matrix, zero_shot=None):
    """AP, MFT, MAP, BWT, forgetting and FWT of an accuracy matrix, as CoIN and SMoLoRA report
    them, in its units. matrix[t][i] = score on task i after training stage t+1 (T rows, T columns,
    tasks in training order); cells above the diagonal (tasks not trained yet) may be None.
    zero_shot: the base model's score per task, for FWT.

        AP         = (1/T) sum_i A[T][i]
        MFT        = (1/T) sum_i A[i][i]
        MAP        = (1/T) sum_t (1/t) sum_{i<=t} A[t][i]
        BWT        = (1/(T-1)) sum_{i<T} (A[T][i] - A[i][i])
                     CoIN's tables divide by T, its formula by T-1
        forgetting = (1/(T-1)) sum_{i<T} (max_{i<=t<T} A[t][i] - A[T][i])
                     ours: the best score since task i was learned (the usual choice); a max over
                     all t < T would also count a score the model had before learning i, which it
                     cannot forget
        FWT        = (1/(T-1)) sum_{i>1} (A[i-1][i] - A[0][i])
                     None without zero_shot or a cell above the diagonal
    With T = 1 there is no earlier task and no later one: BWT, forgetting and FWT are None."""
    _check_matrix(matrix, "matrix")
    T = len(matrix)
    if len(matrix[0]) != T:
        raise ValueError(f"matrix is {T}x{len(matrix[0])}; it must be square: "
                         f"one row per stage, one column per task")
    missing = next(((t, i) for t in range(T) for i in range(t + 1) if matrix[t][i] is None), None)
    if missing:
        raise ValueError(f"matrix[{missing[0]}][{missing[1]}] is None: "
                         f"every task up to the stage trained is needed")
    if zero_shot is not None:
        _check_matrix([zero_shot], "zero_shot")
        if len(zero_shot) != T:
            raise ValueError(f"zero_shot has {len(zero_shot)} scores, the matrix {T} tasks")
    A, last = matrix, matrix[-1]
    metrics = {"AP": sum(last) / T, "MFT": sum(A[i][i] for i in range(T)) / T,
               "MAP": sum(sum(A[t][:t + 1]) / (t + 1) for t in range(T)) / T,
               "BWT": None, "forgetting": None, "FWT": None}
    if T > 1:
        metrics["BWT"] = sum(last[i] - A[i][i] for i in range(T - 1)) / (T - 1)
        best = [max(A[t][i] for t in range(i, T - 1)) for i in range(T - 1)]  # since i was learned
        metrics["forgetting"] = sum(best[i] - last[i] for i in range(T - 1)) / (T - 1)
        before = [A[i - 1][i] for i in range(1, T)]
        if zero_shot is not None and None not in before and None not in zero_shot[1:]:
            metrics["FWT"] = sum(b - z for b, z in zip(before, zero_shot[1:])) / (T - 1)
    return metrics


METRICS = ("AP", "MFT", "MAP", "BWT", "forgetting", "FWT", "MIF", "GK")


def run_metrics(matrix, mif, stages=None, knowledge=None):
    """The metrics of a run's matrices (row 0 zero-shot, row t after stage t), all None until the
    run is complete: every task evaluated after each stage up to it, and MIF and GK (CoIN's general
    knowledge: the mean final knowledge) after the last stage. stages: how many training stages the
    run has (None: one per task, the continual setting); a run of 0 (zero-shot) or 1 over all tasks
    (multitask) has only AP, MIF and GK."""
    T = len(matrix[0])
    last = T if stages is None else stages

    def final(table):  # the mean after the last stage, if every task was evaluated there
        if table and len(table) > last and None not in table[last]:
            return sum(table[last]) / T
        return None
    metrics = dict.fromkeys(METRICS)
    if stages is not None and stages != T:
        if final(matrix) is not None and final(mif) is not None:
            metrics |= {"AP": final(matrix), "MIF": final(mif), "GK": final(knowledge)}
        return metrics
    rows = matrix[1:]
    if len(rows) < T or any(rows[t][i] is None for t in range(T) for i in range(t + 1)):
        return metrics
    zero_shot = matrix[0] if None not in matrix[0] else None
    metrics |= continual_metrics(rows, zero_shot)
    return metrics | {"MIF": final(mif), "GK": final(knowledge)}


SPLIT = ("format_broke_knowledge_kept", "format_broke_knowledge_lost", "format_held")


def dual_forgetting(task, before, after, known=None):
    """The drop of a task's score from `before` (its predictions right after it was learned) to
    `after` (after the last stage), split by the final answer's format and knowledge, in points:
    the SMoLoRA paper's dual forgetting, with CoIN's knowledge axis. With
    d(s) = score_before(s) - score_after(s) and k(s) the final answer's knowledge:

        drop                        = (100/n) sum_s d(s)
        format_broke_knowledge_kept = (100/n) sum_s k(s) d(s), over the samples whose final
                                      answer fails follows_instruction: the content is still
                                      there, the alignment was lost
        format_broke_knowledge_lost = (100/n) sum_s (1 - k(s)) d(s), over the same samples
        format_held                 = (100/n) sum_s d(s), over those that keep the format: the
                                      skill forgotten
    so the three add up to the drop, and for all but caption tasks drop = A[i][i] - A[T][i]. known:
    k(s) of each sample of after, in order (default: the rule judge). Samples are paired by
    question_id; `score` per sample."""
    earlier = {str(p["question_id"]): p["text"] for p in before}
    if sorted(earlier) != sorted(str(p["question_id"]) for p in after) or not after:
        raise ValueError(f"{task}: the two stages' predictions are not of the same (non-empty) "
                         f"set of questions")
    split = dict.fromkeys(SPLIT, 0.0)
    for p, k in zip(after, _sample_knowledge(task, after) if known is None else known):
        was = score(task, earlier[str(p["question_id"])], p["answer"])
        change = 100.0 / len(after) * (was - score(task, p["text"], p["answer"]))  # (100/n) d(s)
        if follows_instruction(task, p["text"], p["answer"]):
            split["format_held"] += change
        else:
            split["format_broke_knowledge_kept"] += k * change
            split["format_broke_knowledge_lost"] += (1 - k) * change
    return {"drop": sum(split.values()), **split}


def routing_overlap(picks, pool):
    """For each pair of tasks (i, j), the chance in % that a sample of i and a sample of j are sent
    to the same expert of `pool` (0: VU, 1: IF) at a layer, averaged over the layers:

        overlap(i, j) = 100 * mean_l sum_e u_i(l, e) u_j(l, e)

    u_i(l, e): the share of i's samples sent to expert e at layer l. picks: {task: per sample, per
    layer, the expert picked in each pool [VU, IF]}. Tasks that share experts share their updates
    too: a later task's tuning rewrites what an earlier one learned there."""
    shares = {}
    for task, samples in picks.items():
        if not samples:
            raise ValueError(f"routing of {task}: no samples")
        counts = [Counter(s[l][pool] for s in samples) for l in range(len(samples[0]))]
        shares[task] = [{e: n / len(samples) for e, n in c.items()} for c in counts]  # u_task(l, e)

    def overlap(u_i, u_j):  # 100 * mean_l sum_e u_i(l, e) u_j(l, e)
        same = sum(sum(p * b.get(e, 0.0) for e, p in a.items()) for a, b in zip(u_i, u_j))
        return 100.0 * same / len(u_i)
    return [[overlap(shares[i], shares[j]) for j in picks] for i in picks]


# ----------------------------------------------------------------------------------------------
# Generation: batched greedy decoding with the KV cache.

# Generous for the tiny tokenizer, which spells words by pieces (a phrase ~12 tokens, a box ~25
# with Llama's); the limit only costs when a model babbles instead of stopping at EOS: what a
# forgetting model does, and MIF must see.
MAX_NEW_TOKENS = {"letter": 8, "phrase": 20, "bbox": 32, "caption": 48}


def generate_predictions(model, processor, records, task, batch_size=16, before_generate=None,
                         desc=None, progress=True):
    """Greedy answers of `model` to `records` (data.load_records), in order, as prediction dicts
    {"question_id", "prompt", "text", "answer"}, text stripped. before_generate(batch), if given,
    sees each collated batch (on the model's device, with its "ins_mask", which goes only to it)
    first: smolora.py sets SMoLoRA's routing there."""
    max_new_tokens, was_training = MAX_NEW_TOKENS[_task(task).answer_kind], model.training
    collate, tokenizer = data.Collator(processor, train=False), processor.tokenizer
    model.eval()  # no adapter dropout while answering
    predictions = []
    try:
        starts = range(0, len(records), batch_size)
        for start in tqdm(starts, desc=desc or task, unit="batch", disable=not progress):
            chunk = records[start:start + batch_size]
            batch = {k: v.to(model.device) for k, v in collate(chunk).items()}
            if "pixel_values" in batch:        # none where the records are text alone
                batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            if before_generate is not None:
                before_generate(batch)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")
                      if k in batch}
            output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
            # left padding: every prompt ends at the same column, the answers start after it
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
            predictions += [{"question_id": r["id"], "prompt": r["text"], "text": t.strip(),
                             "answer": r["answer"]} for r, t in zip(chunk, texts)]
    finally:
        model.train(was_training)
    return predictions


def write_atomic(path, content):
    """Write text or bytes to a temporary file in the same folder, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=folder, prefix=".tmp-", delete=False) as f:
        f.write(content.encode() if isinstance(content, str) else content)
    os.replace(f.name, path)


def save_predictions(path, predictions):
    write_atomic(path, "".join(json.dumps(p) + "\n" for p in predictions))


def load_predictions(path):
    predictions = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    prediction = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
                needed = {"question_id", "text", "answer"}
                if not isinstance(prediction, dict) or not needed <= prediction.keys():
                    raise ValueError(f"{path}:{number}: "
                                     f"a prediction needs question_id, text and answer")
                predictions.append(prediction)
    return predictions


def _predictions_path(run_dir, stage, task):
    return os.path.join(run_dir, "predictions", f"stage{stage}", f"{task}.jsonl")


# ----------------------------------------------------------------------------------------------
# A run's report: results.json, matrix.md and matrix.png.

def _stages(results):
    """What each training stage tuned on: one task per stage unless results says otherwise."""
    return results.get("stages", results["tasks"])


def _row_names(results):
    return ["zero-shot"] + [f"after {stage}" for stage in _stages(results)]


def _cell_text(value):
    return "–" if value is None else f"{value:.2f}"


def _table(corner, columns, rows):
    """Markdown lines: `corner` above the row names, then `columns` (right-aligned); rows are
    (name, cells), each cell text, or a number or None that _cell_text writes."""
    lines = [" | ".join([f"| {corner}".rstrip(), *columns]) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, cells in rows:
        texts = (c if isinstance(c, str) else _cell_text(c) for c in cells)
        lines.append(" | ".join([f"| {name}", *texts]) + " |")
    return lines + [""]


def _judge_name(results):
    if results.get("knowledge_judge"):
        return f"LLM judge {results['knowledge_judge']}, score x 10"
    return "rule judge"


def _matrix_markdown(results):
    tasks, unseen = results["tasks"], results.get("unseen")
    lines = [f"# {results['method']}: {' -> '.join(tasks)}", ""]
    lines += [results["notes"], ""] if results.get("notes") else []
    tables = [("Score (%; CIDEr x100 for captions)", tasks, results["matrix"]),
              ("Instruction following (MIF, % of answers in the asked format)", tasks,
               results["mif"]),
              (f"Knowledge (%, whatever the format; {_judge_name(results)})", tasks,
               results["knowledge"])]
    if unseen:
        tables += [("Unseen tasks, never trained (zero-shot transfer; not in AP): score",
                    unseen["tasks"], unseen["matrix"]),
                   ("Unseen tasks: instruction following", unseen["tasks"], unseen["mif"])]
    for title, columns, matrix in tables:
        lines += [f"## {title}", ""] + _table("", columns, zip(_row_names(results), matrix))
    if results.get("fewshot"):
        lines += ["## Few-shot: each tuned at least 20 steps on k examples per class, from the "
                  "final adapters and from fresh ones (not in AP)", ""]
        columns = ("score", "mif", "fresh_score", "fresh_mif", "majority")
        rows = [(task, (k, *(v.get(c) for c in columns))) for task, shots in
                results["fewshot"].items() for k, v in shots.items()]
        lines += _table("task", ("k", "score", "MIF", "from fresh: score", "from fresh: MIF",
                                 "majority class"), rows)
    lines += ["## Metrics", "", "| " + " | ".join(METRICS) + " |", "|" + "---:|" * len(METRICS),
              "| " + " | ".join(_cell_text(results["metrics"][k]) for k in METRICS) + " |", "",
              "– : not evaluated, or the run is incomplete (metrics need every stage). "
              "BWT and forgetting divide by T-1 (CoIN's tables by T).", ""]
    if results.get("dual_forgetting"):
        lines += ["## Dual forgetting: each earlier task's drop from right after learning it to "
                  "the end", ""]
        rows = [(task, [d[k] for k in ("drop", *SPLIT)])
                for task, d in results["dual_forgetting"].items()]
        lines += _table("task", ("drop", "format broke, knowledge kept",
                                 "format broke, knowledge lost", "format held, answer wrong"), rows)
        lines += ["Points lost on the final answers that fail the task's format, weighted by their "
                  "knowledge (kept: the instruction alignment was lost, CoIN's finding) and by the "
                  "rest (lost), and on those that keep it (the skill forgotten); knowledge by the "
                  f"{_judge_name(results)}; negative: gained. Caption tasks split the per-sample "
                  "CIDEr-D, not the corpus one.", ""]
    if results.get("seconds") is not None:
        lines.append(f"Run time: {results['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def _colour(value):
    """The heatmap colour of a percent value (clipped to 0..100): viridis, dark low, yellow high."""
    # at 0, 1/4, ..., 1; fine in grey
    stops = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
    x = min(max(value / 100.0, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    return tuple(round(a + (b - a) * (x - i)) for a, b in zip(stops[i], stops[i + 1]))


def _canvas(width, height, font):
    """A white image, its ImageDraw, and write(xy, words, anchor=None, fill="black") in `font`."""
    image = Image.new("RGB", (int(width), int(height)), "white")
    draw = ImageDraw.Draw(image)

    def write(xy, words, anchor=None, fill="black"):
        draw.text(xy, words, fill, font, anchor)
    return image, draw, write


def _heatmaps_png(panels, columns, row_names):
    """Percent matrices as heatmaps (title, matrix), one above the other, rows named row_names (a
    row not there yet is drawn empty), with a shared colour scale on the right."""
    font = ImageFont.load_default(size=14)
    label_w = max(font.getlength(n) for n in row_names) + 16
    cell_w, cell_h, pad = max(72, max(font.getlength(c) for c in columns) + 14), 30, 12
    titles_w = max(font.getlength(title) for title, _ in panels)
    content_w = max(label_w + cell_w * len(columns), titles_w)
    panel_h = 2 * cell_h + cell_h * len(row_names)  # title, column names, the rows
    image, draw, write = _canvas(pad + content_w + 110, pad + len(panels) * (panel_h + pad), font)
    for p, (title, matrix) in enumerate(panels):
        top, left = pad + p * (panel_h + pad), pad + label_w
        write((pad, top + 6), title)
        for i, column in enumerate(columns):
            write((left + i * cell_w + cell_w / 2, top + 1.5 * cell_h), column, "mm")
        for t, name in enumerate(row_names):
            y = top + (2 + t) * cell_h
            write((left - 8, y + cell_h / 2), name, "rm")
            for i, value in enumerate(matrix[t] if t < len(matrix) else [None] * len(columns)):
                box = (left + i * cell_w, y, left + (i + 1) * cell_w - 1, y + cell_h - 1)
                fill = (225, 225, 225) if value is None else _colour(value)
                draw.rectangle(box, fill=fill)
                label = "-" if value is None else f"{value:.1f}"
                ink = "black" if sum(fill) / 3 > 110 else "white"
                write(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), label, "mm", ink)
    bar_left, bar_top = pad + content_w + 24, pad + 2 * cell_h
    bar_h = image.height - 2 * pad - 2 * cell_h
    write((bar_left, pad + 6), "%")
    for y in range(bar_h):  # 100 at the top, 0 at the bottom
        colour = _colour(100.0 * (1 - y / (bar_h - 1)))
        draw.line((bar_left, bar_top + y, bar_left + 18, bar_top + y), fill=colour)
    for tick in (0, 25, 50, 75, 100):
        y = bar_top + (1 - tick / 100) * (bar_h - 1)
        draw.line((bar_left + 18, y, bar_left + 23, y), fill="black")
        write((bar_left + 27, y), f"{tick}" + ("+" if tick == 100 else ""), "lm")
    image.save(buffer := io.BytesIO(), format="PNG")
    return buffer.getvalue()


def _evaluated(run_dir, results):
    """(stage, task, path) of each evaluated cell of the run's matrix with saved predictions."""
    return [(t, task, path)
            for t, row in enumerate(results["matrix"]) for task, cell in zip(results["tasks"], row)
            if cell is not None and os.path.isfile(path := _predictions_path(run_dir, t, task))]


def _run_dual_forgetting(run_dir, results):
    """dual_forgetting of each earlier task of a finished continual run, from its saved
    predictions; else {}."""
    tasks, T, matrix, by_task = results["tasks"], len(results["tasks"]), results["matrix"], {}
    finished = _stages(results) == tasks and len(matrix) > T and None not in matrix[T]
    for i, task in enumerate(tasks[:-1] if finished else []):
        learned = _predictions_path(run_dir, i + 1, task)  # right after learning it
        final = _predictions_path(run_dir, T, task)
        if os.path.isfile(learned) and os.path.isfile(final):
            after = load_predictions(final)
            before = load_predictions(learned)
            known = _sample_knowledge(task, after, final, results.get("knowledge_judge"))
            by_task[task] = dual_forgetting(task, before, after, known)
    return by_task


def write_report(run_dir, results):
    """Write results.json, matrix.md and matrix.png (score, MIF and knowledge as heatmaps) into
    run_dir, each atomically; return the results as written. results: {"method", "tasks", "config",
    "matrix", "mif", "seconds"}, optionally "stages" (default: the tasks), "notes", "unseen"
    ({"tasks", "matrix", "mif"} of untrained tasks), "knowledge_judge" (judge_run's LLM; default:
    the rule judge). Rows: 0 zero-shot, t after stage t (rows not run yet left out, cells not
    evaluated None); "knowledge", "metrics", "dual_forgetting" computed here."""
    n_stages = len(_stages(results))
    tables = [("", results)] + ([("unseen ", results["unseen"])] if results.get("unseen") else [])
    for prefix, table in tables:
        for name in ("matrix", "mif"):
            _check_matrix(table[name], prefix + name)
            n_rows, n_columns = len(table[name]), len(table[name][0])
            if n_columns != len(table["tasks"]) or n_rows > n_stages + 1:
                raise ValueError(f"{prefix}{name} is {n_rows}x{n_columns}; expected at most "
                                 f"{n_stages + 1} rows (zero-shot + one per stage) of "
                                 f"{len(table['tasks'])} tasks")
    knowledge_matrix = [[None] * len(row) for row in results["matrix"]]  # percent, as the matrix
    for t, task, path in _evaluated(run_dir, results):
        known = _sample_knowledge(task, load_predictions(path), path,
                                  results.get("knowledge_judge"))
        mean = 100.0 * sum(known) / len(known) if known else None
        knowledge_matrix[t][results["tasks"].index(task)] = mean
    metrics = run_metrics(results["matrix"], results["mif"], n_stages, knowledge_matrix)
    results = {**results, "knowledge": knowledge_matrix, "metrics": metrics,
               "dual_forgetting": _run_dual_forgetting(run_dir, results)}
    write_atomic(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    write_atomic(os.path.join(run_dir, "matrix.md"), _matrix_markdown(results))
    method = results["method"]
    panels = [(f"{method}: score", results["matrix"]),
              (f"{method}: instruction following (MIF)", results["mif"]),
              (f"{method}: knowledge ({_judge_name(results)})", knowledge_matrix)]
    png = _heatmaps_png(panels, results["tasks"], _row_names(results))
    write_atomic(os.path.join(run_dir, "matrix.png"), png)
    return results


# ----------------------------------------------------------------------------------------------
# Re-scoring a run from its saved predictions, and CoIN's LLM judge over them.

def judge_run(run_dir, results, judge, device="cpu", dtype="float32"):
    """Have the causal LM `judge` rate each saved prediction of the run's tasks that it has not
    rated yet, and cache its replies beside them, a file at a time, in
    predictions/stage<t>/<task>.judge.jsonl ({"question_id", "text", "answer", "judge", "reply"}):
    a rerun costs nothing, and only a changed prediction is judged again."""
    judge_lm = None  # (model, tokenizer), loaded for the first prediction not rated yet
    for t, task, path in _evaluated(run_dir, results):
        predictions, replies = load_predictions(path), _cached_replies(path, judge)
        pending = [p for p in predictions if _reply_key(p) not in replies]
        if pending:
            judge_lm = judge_lm or load_judge(judge, device, dtype)
            chats = [judge_messages(task, p) for p in pending]
            new = judge_replies(*judge_lm, chats, desc=f"judging stage{t} {task}")
            for p, reply in zip(pending, new):
                replies[_reply_key(p)] = reply
            save_predictions(_judge_cache(path), [
                {**{k: p[k] for k in ("question_id", "text", "answer")}, "judge": judge,
                 "reply": replies[_reply_key(p)]} for p in predictions])


def _rescored(run_dir, old, tasks):
    """{"matrix", "mif"} of tasks from run_dir's saved predictions (None where a stage has none);
    old: results.json."""
    config, n_rows = old.get("config") or {}, len(_stages(old)) + 1
    cells = [[(None, None)] * len(tasks) for _ in range(n_rows)]  # (score, MIF) per stage and task
    for i, task in enumerate(tasks):
        _task(task)
        test_ids, root = None, config.get("data")
        if root and os.path.isdir(root):  # the run's share of the test records
            records = data.load_records(root, task, "test")[:config.get("max_test")]
            test_ids = Counter(str(r["id"]) for r in records)
        for t in range(n_rows):
            path = _predictions_path(run_dir, t, task)
            if os.path.isfile(path):
                predictions = load_predictions(path)
                if not predictions:
                    raise ValueError(f"{path} is empty")
                ids = Counter(str(p["question_id"]) for p in predictions)
                if test_ids is not None and ids != test_ids:
                    raise ValueError(f"{path}: question ids do not match the {len(test_ids)} test "
                                     f"records of {task} in {root}")
                cells[t][i] = score_predictions(task, predictions)
    return {name: [[cell[k] for cell in row] for row in cells]
            for k, name in enumerate(("matrix", "mif"))}


def rescore_run(run_dir, judge=None, device="cpu", dtype="float32"):
    """Rebuild matrix and mif (and the unseen tasks') from
    run_dir/predictions/stage<t>/<task>.jsonl (stage0 = zero-shot), keep the rest of
    run_dir/results.json, and rewrite the report; knowledge by the LLM `judge` (a causal LM's
    folder or hub id: judge_run) if given, else by the rule judge. Returns the results."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found; RUN_DIR must be a run folder written by smolora.py")
    old = data.read_json(path)
    if not isinstance(old, dict) or not {"method", "tasks"} <= old.keys():
        raise ValueError(f"{path} needs at least 'method' and 'tasks'")
    results = {k: old.get(k) for k in ("method", "tasks", "config", "seconds")}
    results |= {k: old[k] for k in ("stages", "notes") if k in old}
    results |= _rescored(run_dir, old, old["tasks"])
    if old.get("unseen"):
        unseen = old["unseen"]["tasks"]
        results["unseen"] = {"tasks": unseen} | _rescored(run_dir, old, unseen)
    for task, shots in (old.get("fewshot") or {}).items():
        results.setdefault("fewshot", {})[task] = {}
        for k, row in shots.items():
            results["fewshot"][task][k] = dict(row)
            for folder, keys in ((f"fewshot-{k}", ("score", "mif")),
                                 (f"fewshot-{k}-fresh", ("fresh_score", "fresh_mif"))):
                shot_path = os.path.join(run_dir, "predictions", folder, f"{task}.jsonl")
                if os.path.isfile(shot_path):
                    scored = score_predictions(task, load_predictions(shot_path))
                    results["fewshot"][task][k] |= dict(zip(keys, scored))
    if judge:
        judge_run(run_dir, results, judge, device, dtype)
        results["knowledge_judge"] = judge
    return write_report(run_dir, results)


# ----------------------------------------------------------------------------------------------
# The comparison of methods run on the same tasks, seed and base: compare.md and compare.png.

COMPARED = ("AP", "MAP", "BWT", "forgetting", "MIF", "GK")


def _comparison_row(run):
    """A run's metrics, its mean dual-forgetting split over the earlier tasks, and its final mean
    on unseen tasks."""
    dual = list((run.get("dual_forgetting") or {}).values())
    mean_split = {k: sum(d[k] for d in dual) / len(dual) if dual else None for k in SPLIT}
    unseen = (run.get("unseen") or {}).get("matrix")
    finished = unseen and len(unseen) == len(_stages(run)) + 1 and None not in unseen[-1]
    final = unseen[-1] if finished else None
    return {**{k: run["metrics"][k] for k in COMPARED}, **mean_split,
            "unseen": sum(final) / len(final) if final else None}


def _comparison_png(runs):
    """A panel of horizontal bars per metric, one bar per method from the zero line, with its
    interval as a whisker where the run gives one ("intervals": {metric: (low, high)}), and a last
    panel with each method's mean forgetting split three ways (format broke with knowledge kept,
    lost; format held), stacked."""
    font, rows = ImageFont.load_default(size=14), [_comparison_row(r) for r in runs]
    legend = {"format broke, knowledge kept": (240, 170, 60),  # SPLIT's, in order
              "format broke, knowledge lost": (220, 80, 60), "format held": (59, 82, 139)}
    panels = [(k, [[(row[k], (33, 145, 140))] for row in rows],
               [r.get("intervals", {}).get(k) for r in runs]) for k in COMPARED]
    panels.append(("forgetting: split",
                   [[(row[k], c) for k, c in zip(SPLIT, legend.values())] for row in rows],
                   [None] * len(runs)))
    label_w = max(font.getlength(r["method"]) for r in runs) + 16
    bar_h, panel_w, pad, top = 26, 190, 14, 44
    width = int(pad + label_w + len(panels) * (panel_w + pad))
    height = top + bar_h * len(runs) + 3 * pad + 16
    image, draw, write = _canvas(width, height, font)
    for m, r in enumerate(runs):
        write((pad + label_w - 8, top + (m + 0.5) * bar_h), r["method"], "rm")
    for p, (title, bars, whiskers) in enumerate(panels):
        left = pad + label_w + p * (panel_w + pad)
        # each bar's segment ends, from 0, and its whisker: the panel's scale spans them all
        ends = [list(accumulate((v or 0.0 for v, _ in bar), initial=0.0)) for bar in bars]
        spans = [e + list(w or ()) for e, w in zip(ends, whiskers)]
        low, high = min(min(e) for e in spans), max(max(e) for e in spans)
        scale = (panel_w - 80) / (high - low if high > low else 1.0)

        def x(value):
            return left + 40 + (value - low) * scale      # 40 px each side for the value's label
        write((left + panel_w / 2, pad + 8), title, "mm")
        draw.line((x(0), top - 4, x(0), top + bar_h * len(runs)), fill="black")
        for m, (bar, end) in enumerate(zip(bars, ends)):
            y = top + m * bar_h + 4
            for (value, colour), a, b in zip(bar, end, end[1:]):
                if value is not None:
                    draw.rectangle((min(x(a), x(b)), y, max(x(a), x(b)), y + bar_h - 8),
                                   fill=colour)
            middle = y + (bar_h - 8) / 2
            if whiskers[m]:   # the interval: a line with end caps across the bar
                a, b = map(x, whiskers[m])
                draw.line((a, middle, b, middle), fill="black")
                draw.line((a, middle - 4, a, middle + 4), fill="black")
                draw.line((b, middle - 4, b, middle + 4), fill="black")
            label = "-" if all(v is None for v, _ in bar) else f"{end[-1]:.1f}"
            # the label outside the bar's end, and its whisker's
            reach = [end[-1], *(whiskers[m] or ())]
            outer = min(reach) if end[-1] < 0 else max(reach)
            if end[-1] < 0:
                write((x(outer) - 3, middle), label, "rm")
            else:
                write((x(outer) + 3, middle), label, "lm")
    left = width - pad - sum(font.getlength(name) + 30 for name in legend)
    for name, colour in legend.items():
        draw.rectangle((left, height - pad - 12, left + 10, height - pad - 2), fill=colour)
        write((left + 14, height - pad - 7), name, "lm")
        left += font.getlength(name) + 30
    image.save(buffer := io.BytesIO(), format="PNG")
    return buffer.getvalue()


def write_comparison(folder, runs):
    """compare.md and compare.png in folder, from several methods' results (write_report's) on the
    same tasks."""
    if not runs or any(r["tasks"] != runs[0]["tasks"] for r in runs):
        raise ValueError(f"a comparison needs runs on the same tasks, "
                         f"got {[r['tasks'] for r in runs]}")
    tasks, earlier = runs[0]["tasks"], runs[0]["tasks"][:-1]
    columns = (*COMPARED, *SPLIT, "unseen")
    lines = [f"# Comparison: {' -> '.join(tasks)}", "",
             "Each method tuned on the same tasks, in this order, from the same base model and "
             "seed.", ""]
    lines += _table("method", columns, [(r["method"], [row[k] for k in columns])
                                        for r, row in zip(runs, map(_comparison_row, runs))])
    lines += ["Metrics as in each run's matrix.md. format_broke_knowledge_kept / _lost, "
              "format_held: an earlier task's mean drop, in points, on the answers that broke its "
              "format but kept / lost their content, and on those that kept it but were wrong. "
              "unseen: the mean final score on the untrained tasks. –: not defined.", ""]
    lines += [f"- **{r['method']}**: {r['notes']}" for r in runs if r.get("notes")]
    if any(r.get("dual_forgetting") for r in runs):
        per_task = [(r["method"], [" / ".join(f"{r['dual_forgetting'][t][k]:.1f}" for k in SPLIT)
                                   if t in (r.get("dual_forgetting") or {}) else "–"
                                   for t in earlier]) for r in runs]
        lines += ["", "## Dual forgetting per earlier task: format broke, knowledge kept / format "
                  "broke, knowledge lost / format held (points)", ""]
        lines += _table("method", earlier, per_task)
    write_atomic(os.path.join(folder, "compare.md"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(folder, "compare.png"), _comparison_png(runs))


# ----------------------------------------------------------------------------------------------
# SMoLoRA's routing report: which tasks reach the same experts (routing.md, routing.png).

POOLS = ("visual understanding (VU)", "instruction following (IF)")


def write_routing(run_dir, method, picks, pool_size):
    """routing.md and routing.png in run_dir: each pool's routing_overlap of picks; pool_size:
    the experts in a pool (E/2)."""
    overlaps = {name: routing_overlap(picks, pool) for pool, name in enumerate(POOLS)}
    tasks, layers = list(picks), len(next(iter(picks.values()))[0])
    lines = [f"# {method}: which experts the routers pick, after the last stage", "",
             f"Overlap (%): the chance that a test sample of the row's task and one of the "
             f"column's go to the same expert of the pool, averaged over the {layers} SMoLoRA "
             f"layers (`eval.routing_overlap`); 100: the same experts everywhere, "
             f"{100 / pool_size:.0f}: routing at random over {pool_size} experts; below 100 on the "
             "diagonal: a task's own samples spread over several experts.", ""]
    for name, overlap in overlaps.items():
        lines += [f"## {name} pool", ""] + _table("", tasks, zip(tasks, overlap))
    write_atomic(os.path.join(run_dir, "routing.md"), "\n".join(lines))
    panels = [(f"{method}: {name} pool, % same expert", overlap)
              for name, overlap in overlaps.items()]
    write_atomic(os.path.join(run_dir, "routing.png"), _heatmaps_png(panels, tasks, tasks))


# ----------------------------------------------------------------------------------------------
# The command line: python eval.py RUN_DIR [--judge MODEL].

def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Re-score a run's saved predictions and rewrite its report.")
    parser.add_argument("run_dir",
                        help="a run folder (results.json, predictions/stage<t>/<task>.jsonl)")
    parser.add_argument("--judge", metavar="MODEL",
                        help="judge knowledge with this causal LM (a folder or hub id), as CoIN "
                        "does, its replies cached beside the predictions; default: the rule judge")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda")
    parser.add_argument("--dtype", help="float32 | bfloat16 | float16 "
                        "(default: bfloat16 on cuda, float32 on cpu)")
    args = parser.parse_args(argv)
    try:
        dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {dtype!r} is not allowed: "
                             f"choose float32, bfloat16 or float16")
        results = rescore_run(args.run_dir, args.judge, args.device, dtype)
    except ValueError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(_matrix_markdown(results), end="")


if __name__ == "__main__":
    main()
