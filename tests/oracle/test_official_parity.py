"""phivision equals Microsoft's official Phi-3-Vision code on the same checkpoint directory.

The stand-in (conftest.py) has the real config, tokenizer and CLIP geometry with few layers, in float32, and the
official remote code beside its weights. The official side runs in the oracle environment (transformers 4.48,
official_side.py); phivision runs here (transformers 5.x). Compared: the processor's tensors for one, two and four
images in one prompt (tags on lines of their own, two tags side by side, and phivision's own training prompt for two
and four photos of one product) and for a text-only prompt, the image-token arithmetic, the tokenizer's ids, the
logits, and the greedy tokens.

Logit tolerance: both sides compute in float32 (machine epsilon 1.2e-7) the same function in another order (fused
or split projections, SDPA or eager attention, the rotary tables built another way), through 3 CLIP and 2 decoder
layers. Measured: at most 3.8e-6 of the largest logit (3.3e-5 on logits up to 9). The bound, 2e-5 of the largest
logit, keeps 5x headroom over that and is 100x below what a real defect moves: LongRoPE's short and long factors
swapped changes the logits by more than 2e-3 of the largest (test_the_tolerance_sees_a_wrong_rope). Greedy tokens
must be equal, at steps whose two best logits are at least 10x the bound apart (no near-tie decided by rounding).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from official_side import greedy, logit_positions
from oracle_setup import STANDIN
from safetensors.torch import load_file
from standalone_env import ORACLE, CleanEnv, build_once

from phivision.answer.prompt import DEFAULT_QUESTION, prompt_text
from phivision.model import Phi3VForCausalLM, Phi3VProcessor
from phivision.model.configuration_phi3_v import Phi3VConfig

OFFICIAL_CODE = (
    "configuration_phi3_v",
    "modeling_phi3_v",
    "image_embedding_phi3_v",
    "image_processing_phi3_v",
)
MAX_NEW_TOKENS = 8
REL_TOL = 2e-5  # of the largest |logit|
TEXTS = [
    "Product: Check Cotton Shirt, Category: shirts, Full Price: 1290.0",
    "Vintage Leather Tote Bag – €249,99 (limited edition) 🙂",
    "  leading spaces, ünïcödé, tabs\tand\nnewlines  ",
    "<|user|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n",
    "<s><|endoftext|></s><|system|>x<|end|>",
    "",
]
SIZES = [[50, 8000], [8000, 50], [1, 1], [336, 336], [337, 336], [640, 480], [480, 640], [3000, 2999]]


def prompt(num_images: int) -> str:
    """The user turn with ``num_images`` image tags, each on its own line, then the assistant tag."""
    tags = "".join(f"<|image_{i}|>\n" for i in range(1, num_images + 1))
    return f"<|user|>\n{tags}{DEFAULT_QUESTION}<|end|>\n<|assistant|>\n"


# name -> (images, prompt): tags on lines of their own; two tags side by side (the text between them is empty: both
# processors tokenize it as a lone BOS); phivision's own training prompt (answer/prompt.py) for two and four photos.
# New cases go last: each case's photos rotate with its position.
PROMPTS = {
    "one": (1, prompt(1)),
    "two": (2, prompt(2)),
    "four": (4, prompt(4)),
    "adjacent": (2, f"<|user|>\n<|image_1|><|image_2|>{DEFAULT_QUESTION}<|end|><|assistant|>\n"),
    "text": (0, prompt(0)),
    "trained_two": (2, prompt_text(num_images=2)),
    "trained_four": (4, prompt_text(num_images=4)),
}
CASES = {name: k for name, (k, _) in PROMPTS.items()}


@pytest.fixture(scope="session")
def cases(standin: Path, photos: list[Path]) -> list[dict]:
    processor = Phi3VProcessor.from_pretrained(standin)
    # Photos rotate between the cases so that every case sees its own first image.
    return [
        {
            "name": name,
            "prompt": PROMPTS[name][1],
            "images": [str(photos[(i + j) % len(photos)]) for j in range(k)],
            "max_new_tokens": MAX_NEW_TOKENS,
            "stop_ids": processor.stop_token_ids,
            "pad_id": processor.pad_token_id,
        }
        for i, (name, k) in enumerate(CASES.items())
    ]


@pytest.fixture(scope="session")
def official(oracle_env: CleanEnv, standin: Path, cases: list[dict], shared_dir: Path) -> dict:
    """What the official code says: its JSON result plus its tensors."""
    spec = {"checkpoint": str(standin), "cases": cases, "texts": TEXTS, "sizes": SIZES}
    script, threads = Path(__file__).with_name("official_side.py"), torch.get_num_threads()
    folder = build_once(
        shared_dir / "oracle-official",
        lambda d: oracle_env.run(script, spec, d, overlay=ORACLE, threads=threads),
    )
    result = json.loads((folder / "result.json").read_text())
    result["tensors"] = load_file(str(folder / "result.safetensors"))
    return result


def phivision_outputs(model: torch.nn.Module, processor: Phi3VProcessor, case: dict) -> dict:
    """phivision's processor tensors, logits at the official side's positions, greedy tokens and margins."""
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in case["images"]]
    batch = processor(text=case["prompt"], images=images, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    generated, _ = greedy(model, dict(batch), case)
    positions = logit_positions(logits.shape[1], 64)
    return {
        "batch": dict(batch),
        "positions": positions,
        "logits": logits[0, positions],
        "generated": generated,
    }


@pytest.fixture(scope="session", params=["sdpa", "eager"])
def phivision(request: pytest.FixtureRequest, standin: Path, cases: list[dict]) -> dict:
    """phivision on the same directory, with its default attention (SDPA) and with eager attention."""
    model = Phi3VForCausalLM.from_pretrained(standin, dtype=torch.float32, attn_implementation=request.param)
    processor = Phi3VProcessor.from_pretrained(standin)
    outputs = {case["name"]: phivision_outputs(model.eval(), processor, case) for case in cases}
    return {"attn": request.param, "cases": outputs, "processor": processor}


# ------------------------------------------------------------------------------------------- the oracle


def test_the_official_code_ran_as_published(official: dict, official_reference: Path, standin: Path) -> None:
    assert official["transformers"].startswith("4.48.")
    assert official["phivision_importable"] is False
    for name in OFFICIAL_CODE:
        source = official_reference / "official-code" / f"{name}.py"
        assert (standin / f"{name}.py").read_bytes() == source.read_bytes(), name
    assert official["classes"]["model"].startswith("transformers_modules.")
    assert official["classes"]["processor"].startswith("transformers_modules.")
    assert official["attn_implementation"] == "eager"
    loading = official["loading"]
    assert loading["missing_keys"] == [] and loading["unexpected_keys"] == [], loading
    assert loading["clip_layers"] == STANDIN["vision"]["num_hidden_layers"]
    # The stand-in's CLIP is the real geometry: the official code asserts 24 x 24 patches of width 1024.
    vision = Phi3VConfig.from_pretrained(standin).vision_tower_config()
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (336, 14, 1024)


# ------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize("name", CASES)
def test_processor_tensors_equal_the_official(name: str, official: dict, phivision: dict) -> None:
    ours = phivision["cases"][name]["batch"]
    keys = ["input_ids", "attention_mask"] + (["pixel_values", "image_sizes"] if CASES[name] else [])
    assert sorted(ours) == sorted(keys)
    for key in keys:
        theirs = official["tensors"][f"{name}.{key}"]
        assert ours[key].shape == theirs.shape, key
        assert torch.equal(ours[key], theirs.to(ours[key].dtype)), key  # bit for bit, pixels included
    ids = ours["input_ids"][0]
    assert sorted({int(i) for i in ids if i < 0}) == sorted(-k for k in range(1, CASES[name] + 1))


def test_image_token_arithmetic_equals_the_official(official: dict, phivision: dict) -> None:
    processor = phivision["processor"]
    ours = [processor.calc_num_image_tokens_from_image_size(w, h) for w, h in SIZES]
    assert ours == official["image_tokens"]


def test_tokenizer_ids_equal_the_official(official: dict, phivision: dict) -> None:
    tokenizer = phivision["processor"].tokenizer
    assert [tokenizer(text)["input_ids"] for text in TEXTS] == official["encodings"]


# ------------------------------------------------------------------------------------------- model


def logit_bound(logits: torch.Tensor) -> float:
    return REL_TOL * logits.abs().max().item()


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_the_official(name: str, official: dict, phivision: dict) -> None:
    ours = phivision["cases"][name]
    assert ours["positions"] == official["tensors"][f"{name}.logit_positions"].tolist()
    theirs = official["tensors"][f"{name}.logits"]
    assert ours["logits"].shape == theirs.shape and ours["logits"].shape[-1] == 32064
    diff = (ours["logits"] - theirs).abs().max().item()
    print(f"{name} ({phivision['attn']}): max |logit difference| {diff:.2e}, bound {logit_bound(theirs):.2e}")
    assert diff <= logit_bound(theirs)


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_equal_the_official(name: str, official: dict, phivision: dict) -> None:
    theirs = official["cases"][name]
    assert phivision["cases"][name]["generated"] == theirs["generated"]
    # Not a near-tie decided by rounding: at every step the two best logits are 10x the bound apart.
    assert min(theirs["margins"]) > 10 * logit_bound(official["tensors"][f"{name}.logits"]), theirs["margins"]


def test_the_comparison_discriminates(official: dict) -> None:
    """Several tokens per case, not one token repeated, and the images change the answer."""
    answers = {name: tuple(official["cases"][name]["generated"]) for name in CASES}
    assert all(len(ids) == MAX_NEW_TOKENS for ids in answers.values()), answers
    assert all(len(set(ids)) > 1 for ids in answers.values()), answers
    assert len(set(answers.values())) == len(answers), answers


def test_the_tolerance_sees_a_wrong_rope(
    official: dict, standin: Path, cases: list[dict], tmp_path: Path
) -> None:
    """The four-image prompt runs on LongRoPE's long factors: swapping them for the short ones (in config.json)
    moves the logits by far more than the tolerance, so the logit comparison would see such a defect."""
    assert len(official["tensors"]["four.input_ids"][0]) > STANDIN["original_max_position_embeddings"]
    wrong = tmp_path / "swapped"
    shutil.copytree(standin, wrong)
    config = json.loads((wrong / "config.json").read_text())
    rope = config["rope_scaling"]
    rope["long_factor"], rope["short_factor"] = rope["short_factor"], rope["long_factor"]
    (wrong / "config.json").write_text(json.dumps(config))
    model = Phi3VForCausalLM.from_pretrained(wrong, dtype=torch.float32).eval()
    case = next(c for c in cases if c["name"] == "four")
    logits = phivision_outputs(model, Phi3VProcessor.from_pretrained(wrong), case)["logits"]
    theirs = official["tensors"]["four.logits"]
    assert (logits - theirs).abs().max().item() > 100 * logit_bound(theirs)
