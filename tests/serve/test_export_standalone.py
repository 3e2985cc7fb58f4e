"""A standalone export: it loads WITHOUT phivision (transformers 5.x and 4.4x, trust_remote_code=True), answers
with phivision's greedy tokens, offers what vLLM's Phi-3-V path calls, and its tensor names map onto vLLM's.

The clean virtual environment is built once (see standalone_env.py) and the export comes from a real short LoRA
training run on the tiny checkpoint.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from standalone_env import CleanEnv, build_once, clean_env

import phivision.model
from phivision.answer.prompt import prompt_text
from phivision.model import AUTO_MAP, MODEL_CODE_FILES, Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor
from phivision.runs import load_model
from phivision.serve.export import export_run

OFFICIAL_CONFIG = Path(__file__).parents[1] / "model" / "data" / "phi-3-vision-128k-instruct.config.json"
MAX_NEW_TOKENS = 12
# At least ten sizes, the extreme aspect ratios included (vLLM profiles with 50 x 8000).
SIZES = [
    [50, 8000],
    [8000, 50],
    [1, 1],
    [56, 56],
    [57, 55],
    [100, 70],
    [70, 100],
    [336, 336],
    [640, 480],
    [480, 640],
    [1000, 200],
    [3000, 2999],
]
TEXTS = [
    "What is shown in this image?",
    "Product: Check Cotton Shirt, Category: shirts, Full Price: 1290.0",
    "<|user|>\n<|image_1|>Which product is this?<|end|>\n<|assistant|>\n",
    "  leading spaces, ünïcödé, emoji 🙂 and tabs\tand\nnewlines  ",
    "<s><|endoftext|></s><|system|>x<|end|>",
    "",
]


# ------------------------------------------------------------------------------------------------ fixtures
# Every expensive artifact is made once per test session, also under pytest-xdist (build_once), in a directory
# all workers share.

pytestmark = pytest.mark.timeout(1800)  # the first test may wait for the clean venv to be built


@pytest.fixture(scope="session")
def standalone_env() -> CleanEnv:
    return clean_env()


@pytest.fixture(scope="session")
def short_lora_run(tiny_checkpoint: Path, sample_dataset: Path, shared_dir: Path) -> Path:
    """A real (short) LoRA run of phivision's training loop on the tiny checkpoint."""
    from phivision.train import train
    from phivision.train.config import load_config

    overrides = [
        "data.batch_size=2",
        "schedule.max_steps=3",
        "optim.lr=1e-3",
        "eval.gen_samples=0",
        "eval.max_samples=2",
        "lora.dropout=0.0",
        "num_threads=1",
    ]

    def build(out: Path) -> None:
        data = {"path": str(sample_dataset)}
        train(
            load_config(None, overrides, model=str(tiny_checkpoint), out=str(out), data=data), progress=False
        )

    return build_once(shared_dir / "standalone-run", build)


@pytest.fixture(scope="session")
def standalone_export(short_lora_run: Path, shared_dir: Path) -> Path:
    return build_once(shared_dir / "standalone-export", lambda out: export_run(short_lora_run, out))


@pytest.fixture(scope="session")
def photos(shared_dir: Path) -> list[Path]:
    """Three product-like pictures of different sizes and aspect ratios."""
    drawings = [((120, 90), (200, 40, 40)), ((64, 160), (30, 160, 90)), ((300, 140), (40, 60, 210))]

    def build(folder: Path) -> None:
        folder.mkdir()
        for i, (size, colour) in enumerate(drawings):
            image = Image.new("RGB", size, (245, 245, 240))
            box = (size[0] // 6, size[1] // 6, size[0] * 5 // 6, size[1] * 5 // 6)
            ImageDraw.Draw(image).ellipse(box, colour)
            image.save(folder / f"photo{i}.png")

    folder = build_once(shared_dir / "standalone-photos", build)
    return sorted(folder.glob("photo*.png"))


def read_json(path: Path) -> dict:
    return json.loads((path / "result.json").read_text())


@pytest.fixture(scope="session")
def phivision_side(short_lora_run: Path, photos: list[Path], shared_dir: Path) -> dict:
    """What phivision itself says for the same inputs: the RUN loaded by load_model (adapter merged in-process)."""
    from standalone_check import digest

    from phivision.answer.generate import generate_answers

    def build(out: Path) -> None:
        loaded = load_model(short_lora_run, device="cpu", dtype="float32")
        processor, prompt = loaded.processor, prompt_text(loaded.prompt)
        images = [Image.open(p).convert("RGB") for p in photos]
        batches = [processor(text=prompt, images=[image], return_tensors="pt") for image in images]
        generated = []
        for batch in batches:
            with torch.no_grad():
                ids = loaded.model.generate(
                    **batch,
                    max_new_tokens=MAX_NEW_TOKENS,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=processor.stop_token_ids,
                    pad_token_id=processor.pad_token_id,
                )
            generated.append(ids[0, batch["input_ids"].shape[1] :].tolist())
        answers = generate_answers(
            loaded.model,
            processor,
            images,
            loaded.prompt,
            batch_size=1,
            max_new_tokens=MAX_NEW_TOKENS,
            progress=False,
        )
        out.mkdir()
        result = {
            "prompt": prompt,
            "stop_ids": processor.stop_token_ids,
            "generated": generated,
            "answers": answers,  # phivision's one generation loop
            "input_ids": [batch["input_ids"][0].tolist() for batch in batches],
            "pixel_values": [digest(batch["pixel_values"]) for batch in batches],
            "encodings": [processor.tokenizer(text)["input_ids"] for text in TEXTS],
        }
        (out / "result.json").write_text(json.dumps(result))

    return read_json(build_once(shared_dir / "standalone-phivision", build))


def make_spec(export: Path, photos: list[Path], phivision_side: dict) -> dict:
    return {
        "checkpoint": str(export),
        "prompt": phivision_side["prompt"],
        "images": [str(p) for p in photos],
        "max_new_tokens": MAX_NEW_TOKENS,
        "stop_ids": phivision_side["stop_ids"],
        "sizes": SIZES,
        "texts": TEXTS,
    }


@pytest.fixture(scope="session")
def transformers5(standalone_env, standalone_export, photos, phivision_side, shared_dir) -> dict:
    spec = make_spec(standalone_export, photos, phivision_side)
    return read_json(build_once(shared_dir / "standalone-clean5", lambda d: standalone_env.check(spec, d)))


@pytest.fixture(scope="session")
def transformers4(standalone_env, standalone_export, photos, phivision_side, shared_dir) -> dict:
    spec = make_spec(standalone_export, photos, phivision_side)
    clean4 = build_once(
        shared_dir / "standalone-clean4", lambda d: standalone_env.check(spec, d, overlay="4.49")
    )
    return read_json(clean4)


# --------------------------------------------------------------------------------------- the files shipped


def test_export_ships_phivisions_own_model_code(standalone_export: Path) -> None:
    package = Path(phivision.model.__file__).parent
    shipped = sorted(p.name for p in standalone_export.glob("*.py"))
    assert shipped == sorted(MODEL_CODE_FILES)
    for name in MODEL_CODE_FILES:
        # The very file phivision runs, byte for byte: one source of truth.
        assert (standalone_export / name).read_bytes() == (package / name).read_bytes(), name
    config = json.loads((standalone_export / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    preprocessor = json.loads((standalone_export / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == {k: AUTO_MAP[k] for k in ("AutoProcessor", "AutoImageProcessor")}
    tokenizer_config = json.loads((standalone_export / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # not 5.x-only TokenizersBackend
    assert "local_files_only" not in tokenizer_config  # how the exporting process loaded it is not a setting


@pytest.mark.parametrize("name", MODEL_CODE_FILES)
def test_model_code_imports_nothing_of_phivision(name: str) -> None:
    """Only third-party libraries and relative imports of the other shipped files."""
    tree = ast.parse((Path(phivision.model.__file__).parent / name).read_text())
    siblings = {Path(n).stem for n in MODEL_CODE_FILES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] != "phivision", f"{name}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level == 1 and node.module in siblings, f"{name}: from .{node.module}"
            else:
                assert node.module.split(".")[0] != "phivision", f"{name}: from {node.module}"


def file_shape(directory: Path) -> dict:
    """What an export holds, independent of its weights: file names, code, auto_map and tokenizer class."""
    config = json.loads((directory / "config.json").read_text())
    return {
        "files": sorted(p.name for p in directory.iterdir()),
        "auto_map": config["auto_map"],
        "architectures": config["architectures"],
        "code": {p.name: p.read_bytes() for p in directory.glob("*.py")},
        "preprocessor_auto_map": json.loads((directory / "preprocessor_config.json").read_text())["auto_map"],
        "tokenizer_class": json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"],
    }


def official_like_base(tiny_checkpoint: Path, base: Path) -> Path:
    """The tiny checkpoint dressed as a local copy of the official files: bf16, hub code and its auto_map."""
    shutil.copytree(tiny_checkpoint, base)
    for path in base.glob("*.py"):
        path.unlink()
    (base / "processing_phi3_v.py").write_text("# stands in for the hub's remote code\n")
    (base / "image_embedding_phi3_v.py").write_text("# stands in for the hub's remote code\n")
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    config["auto_map"] = {"AutoConfig": "configuration_phi3_v.Phi3VConfig"}
    (base / "config.json").write_text(json.dumps(config))
    preprocessor = json.loads((base / "preprocessor_config.json").read_text())
    preprocessor["auto_map"] = {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"}
    (base / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return base


def hub_cache_with(checkpoint: Path, cache: Path, repo_id: str) -> Path:
    """An offline hub cache holding ``checkpoint`` as ``repo_id`` (the layout huggingface_hub reads)."""
    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return cache


def test_the_export_has_one_shape_whatever_the_base(
    standalone_export: Path, full_run: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The reference is a LoRA run on a local tiny checkpoint; a full fine-tune and a LoRA run whose base is a hub
    id (holding official-like files: bf16, the hub's remote code and auto_map) give the same files.
    (A LoRA run on a local official-like base: tests/serve/test_export.py.)"""
    from serve_helpers import make_lora_run

    reference = file_shape(standalone_export)
    assert file_shape(export_run(full_run, tmp_path / "from-full")) == reference

    # Exported by the CLI in a fresh process, offline, from a local hub cache.
    official = official_like_base(tiny_checkpoint, tmp_path / "official")
    cache = hub_cache_with(official, tmp_path / "hub", "someone/phi3v-tiny")
    run = make_lora_run(official, tmp_path / "run-hub", model_field="someone/phi3v-tiny")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "from-hub"
    proc = subprocess.run(
        [sys.executable, "-m", "phivision.cli", "export", "--run", str(run), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert file_shape(out) == reference
    assert not (out / "image_embedding_phi3_v.py").exists()  # the base's own code is never copied
    assert json.loads((out / "phivision.json").read_text())["base"] == "someone/phi3v-tiny"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16  # the base's dtype is kept


# ----------------------------------------------------------------------------- loading without phivision


def test_transformers5_loads_everything_without_phivision(
    transformers5: dict, standalone_env: CleanEnv
) -> None:
    result = transformers5
    assert result["transformers"].startswith("5.")
    assert result["phivision_importable"] is False
    for part in ("config", "processor", "image_processor", "model"):
        # The classes come from the export's own files (transformers' dynamic-module cache), not a registry.
        assert result["classes"][part].startswith("transformers_modules."), result["classes"][part]
    assert result["model_type"] == "phi3_v"
    assert "Do you wish to run the custom code" not in result["stderr"]
    print(f"clean venv build took {standalone_env.build_seconds} s (cached afterwards)")


def test_greedy_tokens_equal_phivisions(transformers5: dict, phivision_side: dict) -> None:
    assert transformers5["generated"] == phivision_side["generated"]
    # Discriminating: several tokens, and the three photos do not all get the same answer.
    assert all(len(ids) >= 4 for ids in phivision_side["generated"]), phivision_side["generated"]
    assert len({tuple(ids) for ids in phivision_side["generated"]}) > 1, phivision_side["generated"]
    assert transformers5["answers"] == phivision_side["answers"]  # phivision's one generation loop


def test_processor_inputs_equal_phivisions(transformers5: dict, phivision_side: dict) -> None:
    for row, ids, pixels in zip(
        transformers5["inputs"], phivision_side["input_ids"], phivision_side["pixel_values"], strict=True
    ):
        assert row["input_ids"] == ids
        assert any(i < 0 for i in ids)  # negative image ids, as vLLM expects
        assert row["pixel_values"] == pixels
        assert row["image_sizes"][0][0] % 56 == 0 and row["image_sizes"][0][1] % 56 == 0
    assert transformers5["encodings"] == phivision_side["encodings"]


def test_what_vllm_calls_on_the_processor(transformers5: dict) -> None:
    assert transformers5["img_tokens"] == ["<|image_1|>", "<|image_2|>", "<|image_3|>"]
    counts = transformers5["image_tokens"]
    assert len(counts) >= 10 and {(50, 8000), (8000, 50)} <= {tuple(c["size"]) for c in counts}
    for row in counts:
        assert row["calc"] == row["written"], row
        assert row["image_ids"] == [-1]
    crops = transformers5["num_crops_keyword"]
    assert crops["from_pretrained"] == 1 and crops["from_pretrained_tiles"][1] == 2
    assert crops["call_tiles"][1] == 3
    assert crops["calc_with_one_crop"] == 2 * 4 + 1 + 2 * 2  # 1 crop + global, 2x2 merged tokens each


def test_transformers4_reads_config_processor_and_model(
    transformers4: dict, transformers5: dict, phivision_side: dict
) -> None:
    result = transformers4
    assert result["transformers"].startswith("4.4")
    assert result["phivision_importable"] is False
    assert "Do you wish to run the custom code" not in result["stderr"]
    for part in ("config", "processor", "image_processor", "model"):
        assert result["classes"][part].startswith("transformers_modules."), result["classes"][part]
    # The tokenizer files read the same in both majors: same ids, same text back, same specials and template.
    for key in ("encodings", "decoded", "chat", "special", "inputs", "image_tokens", "img_tokens"):
        assert result[key] == transformers5[key], key
    assert result["generated"] == phivision_side["generated"]
    assert result["answers"] == phivision_side["answers"]


# ---------------------------------------------------------------------------------------------- vLLM names

# vLLM's Phi3VForCausalLM.hf_to_vllm_mapper prefixes, applied in this order (a rewritten name goes on to the next).
VLLM_PREFIXES = (
    ("model.vision_embed_tokens.wte", "embed_tokens"),
    ("model.vision_embed_tokens.", "vision_embed_tokens."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
)
CLIP = "vision_embed_tokens.img_processor.vision_model."


def vllm_parameters(config: Phi3VConfig) -> set[str]:
    """The parameter names of vLLM's Phi-3-V model for ``config`` (its module tree, written out by hand).

    Language model: vLLM's Llama with the fused ``qkv_proj``/``gate_up_proj``. Vision: CLIP built only up to
    the feature layer (``num_layers + layer_idx + 1``), with q/k/v stacked into ``qkv_proj`` and no
    ``post_layernorm`` when layers were cut; then the separators and the projector.
    """
    names = {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight"}
    names.add("language_model.lm_head.weight")
    for i in range(config.num_hidden_layers):
        for part in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.qkv_proj",
            "self_attn.o_proj",
            "mlp.gate_up_proj",
            "mlp.down_proj",
        ):
            names.add(f"language_model.model.layers.{i}.{part}.weight")
    vision = config.vision_tower_config()
    kept = vision_layers_kept(config)
    names |= {f"{CLIP}embeddings.class_embedding", f"{CLIP}embeddings.patch_embedding.weight"}
    names |= {f"{CLIP}embeddings.position_embedding.weight"}
    names |= {f"{CLIP}pre_layrnorm.{p}" for p in ("weight", "bias")}
    if kept == vision.num_hidden_layers:
        names |= {f"{CLIP}post_layernorm.{p}" for p in ("weight", "bias")}
    for i in range(kept):
        for part in (
            "self_attn.qkv_proj",
            "self_attn.out_proj",
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ):
            names |= {f"{CLIP}encoder.layers.{i}.{part}.{p}" for p in ("weight", "bias")}
    names |= {"vision_embed_tokens.glb_GN", "vision_embed_tokens.sub_GN"}
    names |= {f"vision_embed_tokens.img_projection.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    return names


def vision_layers_kept(config: Phi3VConfig) -> int:
    layer_idx, layers = config.vision_layer_idx, config.vision_tower_config().num_hidden_layers
    return layers + layer_idx + 1 if layer_idx < 0 else layer_idx + 1


def vllm_name(name: str, config: Phi3VConfig) -> str | None:
    """Where vLLM's loader puts checkpoint tensor ``name``; None for what its CLIP loader drops on purpose."""
    for prefix, new in VLLM_PREFIXES:
        if name.startswith(prefix):
            name = new + name[len(prefix) :]
    if name.startswith(CLIP):
        rest = name[len(CLIP) :]
        if rest.startswith("encoder.layers.") and int(rest.split(".")[2]) >= vision_layers_kept(config):
            return None  # layers past the feature layer are not built
        if (
            rest.startswith("post_layernorm.")
            and vision_layers_kept(config) < config.vision_tower_config().num_hidden_layers
        ):
            return None
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = name.replace(f".self_attn.{proj}.", ".self_attn.qkv_proj.")
    return name


def check_vllm_mapping(names: set[str], config: Phi3VConfig) -> None:
    expected = vllm_parameters(config)
    mapped = {n: vllm_name(n, config) for n in names}
    dropped = sorted(n for n, v in mapped.items() if v is None)
    left_over = sorted(n for n, v in mapped.items() if v is not None and v not in expected)
    missing = sorted(expected - {v for v in mapped.values() if v is not None})
    assert not left_over, f"tensors vLLM has no place for: {left_over[:8]}"
    assert not missing, f"vLLM parameters the checkpoint does not fill: {missing[:8]}"
    last = config.vision_tower_config().num_hidden_layers - 1
    assert all(f"encoder.layers.{last}." in n or "post_layernorm" in n for n in dropped), dropped


def test_export_tensor_names_map_onto_vllm(standalone_export: Path) -> None:
    names: set[str] = set()
    for path in standalone_export.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    check_vllm_mapping(names, Phi3VConfig.from_pretrained(standalone_export))


def test_full_size_tensor_names_map_onto_vllm() -> None:
    config = Phi3VConfig.from_dict(json.loads(OFFICIAL_CONFIG.read_text()))
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    names = set(model.state_dict())
    assert len(names) == 32 * 6 + 3 + 24 * 16 + 7 + 6  # the official checkpoint's 592 tensors
    check_vllm_mapping(names, config)


def test_image_token_arithmetic_at_the_official_size() -> None:
    """At 336 px / 16 crops (vLLM profiles with a 50 x 8000 image): arithmetic == positions the processor writes."""
    from phivision.model import Phi3VProcessor
    from phivision.tiny_tokenizer import build_tiny_tokenizer

    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=16), build_tiny_tokenizer())
    for width, height in SIZES:
        batch = processor(text="<|image_1|>", images=[Image.new("RGB", (width, height), (128, 128, 128))])
        written = int((batch["input_ids"] < 0).sum())
        assert processor.calc_num_image_tokens_from_image_size(width=width, height=height) == written
    # 50 x 8000 is 16 tiles high, 1 wide: (16 + 1) * 144 + 1 + (16 + 1) * 12; 8000 x 50 has one row of 16 tiles.
    assert processor.calc_num_image_tokens_from_image_size(width=50, height=8000) == 2653
    assert processor.calc_num_image_tokens_from_image_size(width=8000, height=50) == 2473
