"""Runs and exports from a base with the real tokenizer: its files read the same in transformers 4.48, 4.49,
4.57 and 5.x as Microsoft's own files do, and a base's ``auto_map`` (someone's remote code) never survives.

The base is a small stand-in with the real tokenizer and vocabulary into whose config.json,
preprocessor_config.json and tokenizer_config.json an untrusted ``auto_map`` was planted (issue 20, case 4:
``"AutoTokenizer": ["someone/repo--tok.Evil", null]``). A LoRA and a full fine-tuning run are trained on it by
phivision's own training loop and exported; every JSON file of both runs and both exports is read. The tokenizer
files are then loaded in clean virtual environments (standalone_env.py) with ``trust_remote_code=True``, as vLLM
loads them, and compared with the reference files read by transformers 4.48, the official model's release.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from standalone_env import CleanEnv, build_once, clean_env

from phivision.model import AUTO_MAP, PROCESSOR_AUTO_MAP
from phivision.serve.export import export_run

pytestmark = pytest.mark.timeout(1800)  # the first test may wait for the clean venv and its overlays

PLANTED = ["someone/repo--tok.Evil", None]
TOKENIZER_CHECK = Path(__file__).with_name("tokenizer_check.py")
TEXTS = [
    "Product: Check Cotton Shirt, Category: shirts, Full Price: 1290.0",
    "Monogram Canvas Speedy Bandoulière 25 – Limited Édition, €1.890,50",
    "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\n",
    "<|system|>\nYou read product photos.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
    "  leading spaces, ünïcödé, emoji 🙂, tabs\tand\nnewlines  ",
    "<s><|endoftext|></s><|placeholder1|><unk>",
    "日本語のテキスト와 한국어",
    "",
]


def plant_auto_map(base: Path) -> None:
    """An untrusted base: every file that can hold an auto_map points at someone's code."""
    for name, entries in (
        ("tokenizer_config.json", {"AutoTokenizer": PLANTED}),
        ("config.json", {"AutoTokenizer": PLANTED, "AutoProcessor": "someone/repo--proc.Evil"}),
        ("preprocessor_config.json", {"AutoProcessor": "someone/repo--proc.Evil"}),
    ):
        path = base / name
        data = json.loads(path.read_text())
        data["auto_map"] = {**data.get("auto_map", {}), **entries}
        path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="session")
def planted_base(real_tokenizer_checkpoint: Path, shared_dir: Path) -> Path:
    def build(base: Path) -> None:
        shutil.copytree(real_tokenizer_checkpoint, base)
        plant_auto_map(base)

    return build_once(shared_dir / "planted-base", build)


def train_run(base: Path, data: Path, out: Path, method: str) -> None:
    from phivision.train import train
    from phivision.train.config import load_config

    overrides = [
        f"method={method}",
        "data.batch_size=2",
        "schedule.max_steps=2",
        "checkpoint.every_steps=1",
        "eval.gen_samples=0",
        "eval.max_samples=2",
        "num_threads=1",
    ]
    config = load_config(None, overrides, model=str(base), out=str(out), data={"path": str(data)})
    train(config, progress=False)


@pytest.fixture(scope="session", params=["lora", "full"])
def run_and_export(
    request: pytest.FixtureRequest, planted_base: Path, sample_dataset: Path, shared_dir: Path
) -> tuple[Path, Path]:
    method = request.param
    run = build_once(
        shared_dir / f"planted-{method}-run", lambda out: train_run(planted_base, sample_dataset, out, method)
    )
    export = build_once(shared_dir / f"planted-{method}-export", lambda out: export_run(run, out))
    return run, export


def auto_maps(value: object, where: str = "") -> Iterator[tuple[str, object]]:
    """Every ``auto_map`` in a JSON value, at any depth, with the path to it."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "auto_map":
                yield f"{where}/{key}", item
            yield from auto_maps(item, f"{where}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from auto_maps(item, f"{where}/{i}")


def test_the_planted_base_is_what_the_issue_describes(planted_base: Path) -> None:
    config = json.loads((planted_base / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": PLANTED}
    assert config["tokenizer_class"] == "LlamaTokenizer"  # the real file, as downloaded


def test_runs_and_exports_keep_no_auto_map_phivision_did_not_write(run_and_export: tuple[Path, Path]) -> None:
    run, export = run_and_export
    allowed = {
        export / "config.json": {"/auto_map": AUTO_MAP},
        export / "preprocessor_config.json": {"/auto_map": PROCESSOR_AUTO_MAP},
    }
    files = sorted([*run.rglob("*.json"), *export.rglob("*.json")])
    assert run / "processor" / "tokenizer_config.json" in files
    assert export / "tokenizer_config.json" in files
    assert len([f for f in files if f.parent.name.startswith("step-")]) >= 2  # the checkpoints too
    for path in files:
        found = dict(auto_maps(json.loads(path.read_text())))
        assert found == allowed.get(path, {}), path
    for path in [*run.rglob("*"), *export.rglob("*")]:
        if path.is_file() and path.suffix in (".json", ".yaml", ".jinja", ".jsonl", ".py"):
            assert "someone/repo" not in path.read_text(), path


# ------------------------------------------------------------------------- read by four transformers releases


@pytest.fixture(scope="session")
def clean() -> CleanEnv:
    return clean_env()


def read_tokenizer(env: CleanEnv, folder: Path, overlay: str | None, workdir: Path) -> dict:
    spec = {"folder": str(folder), "texts": TEXTS}
    result = build_once(workdir, lambda d: env.run(TOKENIZER_CHECK, spec, d, overlay=overlay))
    return json.loads((result / "result.json").read_text())


@pytest.fixture(scope="session")
def official(clean: CleanEnv, reference_dir: Path, shared_dir: Path) -> dict:
    """Microsoft's tokenizer files read by transformers 4.48, the release the official code runs on."""
    return read_tokenizer(clean, reference_dir, "4.48", shared_dir / "tokenizer-official")


@pytest.mark.parametrize("overlay", ["4.48", "4.49", "4.57", None], ids=["4.48", "4.49", "4.57", "5.x"])
def test_the_export_tokenizer_reads_as_the_official_one(
    overlay: str | None, official: dict, clean: CleanEnv, run_and_export: tuple[Path, Path], shared_dir: Path
) -> None:
    run, export = run_and_export
    result = read_tokenizer(clean, export, overlay, shared_dir / f"tokenizer-{run.name}-{overlay}")
    assert result["transformers"].startswith(overlay or "5.")
    assert "someone" not in result["stderr"]
    assert official["class"] == "LlamaTokenizerFast" and official["size"] == 32045
    for key in ("size", "vocab_sha256", "encodings", "without_specials", "decoded", "chat", "special"):
        assert result[key] == official[key], key
    assert any(len(ids) > 20 for ids in official["encodings"])
