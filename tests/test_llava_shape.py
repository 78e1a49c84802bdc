"""The real-checkpoint path without a GPU: a checkpoint folder shaped like llava-hf/llava-1.5-7b-hf (its processor
settings and chat template, a SentencePiece-style BPE tokenizer with <image> and <pad> added, bfloat16) at tiny
widths, and a data folder in CoIN's layout with photos of COCO's sizes."""
import json
import os

import pytest
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlamaTokenizer, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

import data
import smolora
from test_run import exits_interrupted, interrupt, same_run

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TASKS = "grounding,vqav2"
PHOTOS = {"COCO_train2014_000000000009.jpg": ((640, 427), (12, 80, 150, 300)),    # a box near the left edge
          "COCO_train2014_000000000025.jpg": ((480, 640), (300, 20, 470, 200))}   # near the top right


def sentences():
    """A few hundred sentences in the tasks' words, numbers and boxes: what the tokenizer's merges are learned on."""
    words = [w for w in data.vocabulary_words() if len(w) > 1]
    lines = [t.instruction for t in data.TASKS.values()] + [p for t in data.TASKS.values() for p in t.paraphrases]
    lines += [" ".join(words[i::7][:12]) for i in range(200)]
    lines += [data.format_box([i / 100, (i * 7 % 100) / 100, 0.5, 0.99]) + f" {i} times" for i in range(100)]
    return lines


def llama_style_tokenizer():
    """A BPE over Metaspace words with byte fallback, as Llama's tokenizer: <unk> <s> </s>, 256 byte tokens, merges
    learned here; then <image> and <pad> added at the end of the vocabulary, as llava-hf adds them (32000, 32001)."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(sentences(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                             show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def llava15_processor():
    """llava-1.5-7b-hf's processor: CLIP at 336 px in 14-pixel patches (576 image tokens + CLS, CLS dropped),
    its resize-and-centre-crop image processor, its chat template."""
    images = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                   image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return LlavaProcessor(image_processor=images, tokenizer=llama_style_tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=data.CHAT_TEMPLATE)


def llava15_model(processor):
    """LLaVA-1.5-7B's shape at tiny widths: CLIP ViT /14 at 336, feature layer -2, a Llama, a 2-layer GELU projector."""
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         pad_token_id=tokenizer.pad_token_id)
    return LlavaForConditionalGeneration(config).to(torch.bfloat16)


def photo(size, box):
    """A noisy photo with a red rectangle over `box` (pixels)."""
    generator = torch.Generator().manual_seed(size[0])
    noise = torch.randint(60, 200, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(noise.numpy())
    ImageDraw.Draw(image).rectangle(box, fill=(255, 0, 0))
    return image


def coin_box(size, box):
    """CoIN's answer_bbox: the box normalised to the image padded to a square (centred), as LLaVA-1.5 sees it."""
    width, height = size
    side = max(size)
    x1, y1, x2, y2 = box
    dx, dy = (side - width) / 2, (side - height) / 2
    return [(x1 + dx) / side, (y1 + dy) / side, (x2 + 1 + dx) / side, (y2 + 1 + dy) / side]


def coin_folder(root):
    """cl_dataset/COCO2014/train2014/*.jpg and Instruction_Type1/<Folder>/{train,test}.json linked as <task>."""
    images = root / "cl_dataset" / "COCO2014" / "train2014"
    images.mkdir(parents=True)
    for name, (size, box) in PHOTOS.items():
        photo(size, box).save(images / name, quality=95)
    grounding, vqa = data.TASKS["grounding"], data.TASKS["vqav2"]
    files = {"Grounding": ([], []), "VQAv2": ([], [])}
    for i, (name, (size, box)) in enumerate(list(PHOTOS.items()) * 2):
        image = f"COCO2014/train2014/{name}"
        answer = data.format_box(coin_box(size, box))
        files["Grounding"][0].append({"id": f"g{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + data.compose_text(grounding, "the red box")},
            {"from": "gpt", "value": answer}]})
        files["Grounding"][1].append({"question_id": f"g{i}", "image": image, "size": list(size), "answer_bbox": answer,
                                      "text": data.compose_text(grounding, "the red box")})
        files["VQAv2"][0].append({"id": f"v{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + data.compose_text(vqa, "What colour is the box?")},
            {"from": "gpt", "value": "red"}]})
        files["VQAv2"][1].append({"question_id": f"v{i}", "image": image, "answer": ["red"] * 10,
                                  "text": data.compose_text(vqa, "What colour is the box?")})
    for folder, (train, test) in files.items():
        instructions = root / "Instruction_Type1" / folder
        instructions.mkdir(parents=True)
        (instructions / "train.json").write_text(json.dumps(train))
        (instructions / "test.json").write_text(json.dumps(test))
        os.symlink(instructions, root / "cl_dataset" / folder.lower())
    return root / "cl_dataset"


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava15")
    torch.manual_seed(0)
    processor = llava15_processor()
    smolora.save_checkpoint(llava15_model(processor), processor, root / "llava-1.5-shaped")
    return root / "llava-1.5-shaped", coin_folder(root)


def run_args(llava15, out, method, *extra):
    """4 training records a task in steps of 2 accumulated micro-batches of 1: 2 steps a stage."""
    model, root = llava15
    return ["--tasks", TASKS, "--method", method, "--model", str(model), "--data", str(root), "--out", str(out),
            "--dtype", "bfloat16", "--grad-checkpointing", "--batch-size", "1", "--grad-accum", "2", "--r", "8",
            "--alpha", "16", "--experts", "4", "--lr", "1e-2", "--max-test", "1", "--cache", str(out / "cache"), *extra]


ADAPTERS = ("lora", "olora", "moelora", "smolora")


@pytest.fixture(scope="module")
def compared(llava15, tmp_path_factory):
    """One comparison of every adapter on the llava-1.5-shaped checkpoint, in bfloat16 with checkpointing."""
    out = tmp_path_factory.mktemp("compared")
    smolora.main(run_args(llava15, out, ",".join(ADAPTERS)))
    return out


def test_the_checkpoint_reloads_with_llava15s_shape(llava15):
    model, processor = smolora.load_model(llava15[0], dtype=torch.bfloat16)
    tokenizer = processor.tokenizer
    assert model.dtype == torch.bfloat16 and model.config.vision_feature_layer == -2
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 2) == "<image>" and tokenizer.pad_token == "<pad>"
    assert data.prompt_text(processor, "Q?") == "USER: <image>\nQ? ASSISTANT:"
    ids = processor(images=[Image.new("RGB", (640, 427))], text=["<image>"], return_tensors="pt")["input_ids"]
    assert (ids == model.config.image_token_index).sum() == 576


def test_labels_and_instruction_mask_decode_to_exactly_the_answer_and_the_instruction(llava15):
    _, processor = smolora.load_model(llava15[0])
    tokenizer = processor.tokenizer
    records = [r for task in TASKS.split(",") for r in data.load_records(llava15[1], task, "train")[:2]]
    batch = data.Collator(processor, train=True)(records)
    for b, record in enumerate(records):
        answer = batch["input_ids"][b][batch["labels"][b] != -100]
        assert tokenizer.decode(answer) == record["answer"] + tokenizer.eos_token
        assert tokenizer.decode(batch["input_ids"][b][batch["ins_mask"][b]]) == record["instruction"]


def red_box(pixel_values, processor):
    """The bounding box, in the model's 336-pixel frame, of the pixels that are the drawn red."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    rgb = pixel_values.float() * std + mean                                    # (3, H, W) in [0, 1]
    red = (rgb[0] > 0.9) & (rgb[1] < 0.15) & (rgb[2] < 0.15)
    ys, xs = red.nonzero(as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_a_box_in_a_photo_lands_in_the_pixels_where_its_answer_says(llava15):
    """640x427 and 480x640: padded to a square before the checkpoint's resize-and-crop processor (LLaVA-1.5's
    expand2square), the box drawn in the photo sits where CoIN's normalised answer puts it, to the answer's
    precision (2 decimals: 3.4 of 336 pixels)."""
    _, processor = smolora.load_model(llava15[0])
    for record in data.load_records(llava15[1], "grounding", "test")[:2]:
        pixels = data.Collator(processor, train=False)([record])["pixel_values"][0]
        assert pixels.shape == (3, 336, 336)
        expected = [v * 336 for v in record["answer"]]
        assert all(abs(a - b) <= 3.36 for a, b in zip(red_box(pixels, processor), expected)), record["image"]
        cropped = processor.image_processor(data.load_image(record), return_tensors="pt")["pixel_values"][0]
        assert any(abs(a - b) > 20 for a, b in zip(red_box(cropped, processor), expected))   # what padding fixes


def test_square_images_are_not_changed_by_the_padding(tmp_path):
    """The synthetic images are square: the collator's pixels are the tiny processor's own, bit for bit."""
    processor = data.build_processor()
    data.make_synthetic(tmp_path, ["grounding"], n_train=4, n_test=1, seed=0, progress=False)
    records = data.load_records(tmp_path, "grounding", "train")
    pixels = data.Collator(processor, train=True)(records)["pixel_values"]
    own = processor.image_processor([data.load_image(r) for r in records], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, own)


@pytest.mark.parametrize("method", ADAPTERS)
def test_every_adapter_runs_end_to_end_in_bfloat16_with_checkpointing(compared, method):
    saved = json.loads((compared / method / "results.json").read_text())
    assert saved["config"]["dtype"] == "bfloat16" and saved["config"]["grad_accum"] == 2
    assert saved["config"]["grad_checkpointing"] and all(v is not None for row in saved["matrix"] for v in row)
    for task in TASKS.split(","):
        assert len((compared / method / "predictions" / "stage2" / f"{task}.jsonl").read_text().splitlines()) == 1


def test_resume_in_bfloat16_gives_the_same_matrix(llava15, compared, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        interrupt(m, 4)                                  # 2 steps a stage: stage 2's second
        line = exits_interrupted(run_args(llava15, tmp_path, "smolora"), capsys)
    assert line == "interrupted at stage 2 step 1; continue with --resume"
    smolora.main(run_args(llava15, tmp_path, "smolora", "--resume"))
    same_run(tmp_path, compared / "smolora")


def test_the_7b_table_counts_what_the_formula_gives():
    """tests/llava7b_memory.py on the meta device: LoRA's trainable parameters are r (d_in + d_out) over the 7
    linears of the 32 layers (4 of 4096 x 4096; gate, up 4096 -> 11008; down 11008 -> 4096), by hand."""
    import llava7b_memory
    trainable, state, weights = llava7b_memory.count("lora")
    assert trainable == 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert state == trainable * 4 * 4 and 13e9 < weights < 15e9          # 7.06B parameters in bfloat16
