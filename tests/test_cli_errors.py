"""A user's mistake never traces back: a table of bad command lines and hostile inputs, each run through the real
``phivision`` command. Every row must end with exit code 2, exactly one ``error:`` line on stderr naming the flag,
file or key at fault, no traceback, no numpy repr, and every file that existed before unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Case:
    """``args`` may use {ckpt}, {data}, {file}, {dir}, {tmp}, {bad_yaml}, {predictions} and {csv}; ``names``
    must all appear in the error line (after the same substitution)."""

    args: list[str]
    names: list[str]
    file_size_limit: int | None = None  # RLIMIT_FSIZE in bytes: a disk that fills up
    env: dict[str, str] = field(default_factory=dict)


CASES = {
    "serve --port out of range": Case(["serve", "--model", "{ckpt}", "--port", "99999"], ["--port 99999"]),
    "serve --max-new-tokens 0": Case(
        ["serve", "--model", "{ckpt}", "--max-new-tokens", "0"], ["--max-new-tokens"]
    ),
    "evaluate --max-new-tokens 0": Case(
        ["evaluate", "--model", "{ckpt}", "--data", "{data}", "--out", "{dir}/eval", "--max-new-tokens", "0"],
        ["--max-new-tokens 0"],
    ),
    "predict --batch-size 0": Case(
        ["predict", "{data}/images", "--model", "{ckpt}", "--batch-size", "0"], ["--batch-size 0"]
    ),
    "sample --n 0 over a dataset": Case(["sample", "--out", "{data}", "--n", "0"], ["--n 0"]),
    "tiny --num-crops 0": Case(["tiny", "--out", "{tmp}/tiny", "--num-crops", "0"], ["--num-crops 0"]),
    "tiny --out inside a file": Case(["tiny", "--out", "{file}/tiny"], ["{file}"]),
    "train --out a file": Case(
        [
            "train",
            "--out",
            "{file}",
            "--data",
            "{data}",
            "--model",
            "{ckpt}",
            "method=full",
            "schedule.max_steps=1",
        ],
        ["{file}"],
    ),
    "train with an unknown config key": Case(
        ["train", "--out", "{tmp}/run", "--data", "{data}", "--model", "{ckpt}", "optim.lrr=1"], ["optim.lrr"]
    ),
    "train with broken YAML": Case(
        ["train", "--out", "{tmp}/run", "--data", "{data}", "--model", "{ckpt}", "--config", "{bad_yaml}"],
        ["{bad_yaml}:4"],  # file:line
    ),
    "train optim.lr=nan": Case(
        ["train", "--out", "{tmp}/run", "--data", "{data}", "--model", "{ckpt}", "optim.lr=nan"], ["optim.lr"]
    ),
    "train optim.betas out of range": Case(
        ["train", "--out", "{tmp}/run", "--data", "{data}", "--model", "{ckpt}", "optim.betas=[2,3]"],
        ["optim.betas"],
    ),
    "train eval.metric misspelt": Case(
        ["train", "--out", "{tmp}/run", "--data", "{data}", "--model", "{ckpt}", "eval.metric=val_los"],
        ["eval.metric", "val_los"],
    ),
    "train on a catalog holding a decompression bomb": Case(
        ["train", "--out", "{tmp}/run", "--data", "{bomb_data}", "--model", "{ckpt}", "method=full"],
        ["{bomb_image}"],
    ),
    "sample into another dataset": Case(["sample", "--out", "{data}", "--n", "7", "--seed", "5"], ["{data}"]),
    "prepare into another dataset": Case(
        ["prepare", "--source", "{csv}", "--out", "{data}", "--allow-local", "--no-progress"], ["{data}"]
    ),
    "report on predictions with missing keys": Case(
        ["report", "--predictions", "{predictions}"], ["{predictions}", "line 1", "truth"]
    ),
    "a flag of the wrong type": Case(["sample", "--out", "{tmp}/s", "--n", "many"], ["--n"]),
    "a missing required flag": Case(["evaluate", "--model", "{ckpt}", "--data", "{data}"], ["--out"]),
    "an unknown verb": Case(["trian", "--out", "{tmp}/run"], ["trian"]),
    "demo --out a folder it did not write": Case(["demo", "--out", "{dir}"], ["{dir}", "keep.txt"]),
    "demo --n 0": Case(["demo", "--out", "{tmp}/demo", "--n", "0"], ["--n 0"]),
    # values no range of the old flags caught (tracebacks, or silently accepted): one line naming the flag
    "sample --seed -1": Case(["sample", "--out", "{tmp}/s", "--n", "6", "--seed", "-1"], ["--seed -1"]),
    "prepare --seed -1": Case(
        ["prepare", "--source", "{csv}", "--out", "{tmp}/p", "--seed", "-1", "--allow-local"], ["--seed -1"]
    ),
    "report --seed -1": Case(["report", "--predictions", "{predictions}", "--seed", "-1"], ["--seed -1"]),
    "sample --n 1000000000000": Case(
        ["sample", "--out", "{tmp}/s", "--n", "1000000000000"], ["--n 1000000000000", "at most"]
    ),
    "export --max-shard-size abc": Case(
        ["export", "--run", "{dir}", "--out", "{tmp}/e", "--max-shard-size", "abc"],
        ["--max-shard-size 'abc'"],
    ),
    "export --max-shard-size 0": Case(
        ["export", "--run", "{dir}", "--out", "{tmp}/e", "--max-shard-size", "0"], ["--max-shard-size '0'"]
    ),
    "export --max-shard-size 1B": Case(
        ["export", "--run", "{dir}", "--out", "{tmp}/e", "--max-shard-size", "1B"], ["--max-shard-size '1B'"]
    ),
    "export --max-shard-size -1GB": Case(
        ["export", "--run", "{dir}", "--out", "{tmp}/e", "--max-shard-size=-1GB"], ["--max-shard-size '-1GB'"]
    ),
    "serve --max-upload-mb 1e-9": Case(
        ["serve", "--model", "{ckpt}", "--max-upload-mb", "1e-9"], ["--max-upload-mb 1e-09", "at least 0.01"]
    ),
    "sample --out ''": Case(["sample", "--out", "", "--n", "6"], ["--out ''"]),
    "inspect --out ''": Case(["inspect", "{data}", "--out", ""], ["--out ''"]),
    "inspect --num-img-tokens 7": Case(
        ["inspect", "{data}", "--num-img-tokens", "7"], ["--num-img-tokens 7"]
    ),
    "predict --device bogus": Case(
        ["predict", "{data}/images", "--model", "{ckpt}", "--device", "bogus"], ["--device 'bogus'"]
    ),
    "predict --device cuda without CUDA": Case(
        ["predict", "{data}/images", "--model", "{ckpt}", "--device", "cuda"],
        ["--device cuda", "no CUDA device"],
        env={"CUDA_VISIBLE_DEVICES": ""},
    ),
    "sample split ratios that do not sum to 1": Case(
        ["sample", "--out", "{tmp}/s", "--n", "6", "--split", "0.8,0.1,0.5"], ["--split '0.8,0.1,0.5'", "sum"]
    ),
    "prepare split ratios that do not sum to 1": Case(
        ["prepare", "--source", "{csv}", "--out", "{tmp}/p", "--split", "0.5,0.5,0.5", "--allow-local"],
        ["--split '0.5,0.5,0.5'", "sum"],
    ),
    "a full disk during prepare": Case(
        ["prepare", "--source", "{csv}", "--out", "{tmp}/prepared", "--allow-local", "--no-progress"],
        ["{tmp}/prepared"],  # the file that could not be written
        file_size_limit=4_000,
    ),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_checkpoint, sample_dataset) -> dict[str, Path]:
    """Files a user already has: a checkpoint, a dataset, an ordinary file, a folder of their own work, broken
    inputs, and a product table whose images are local files."""
    root = tmp_path_factory.mktemp("user")
    ckpt, data = root / "ckpt", root / "data"
    shutil.copytree(tiny_checkpoint, ckpt)
    shutil.copytree(sample_dataset, data)
    (root / "notes.txt").write_text("my notes\n")
    (root / "mine").mkdir()
    (root / "mine" / "keep.txt").write_text("precious\n")
    (root / "bad.yaml").write_text("method: full\noptim:\n  lr: [0.1\n")
    bomb_data = root / "bomb_data"
    shutil.copytree(sample_dataset, bomb_data)
    import pandas as pd
    from PIL import Image

    catalog = pd.read_parquet(bomb_data / "catalog.parquet")
    bomb_image = catalog.loc[catalog["split"] == "train", "image_path"].iloc[0]
    (bomb_data / bomb_image).unlink()
    Image.new("L", (20_000, 20_000)).save(bomb_data / bomb_image, format="PNG")  # 400 Mpx in a small file
    (root / "predictions.jsonl").write_text('{"image": "a.jpg", "answer": "Product: x"}\n')
    images = sorted((data / "images").iterdir())
    with open(root / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["product_code", "title", "category3_code", "full_price", "currency_code", "imageurl"]
        )
        for i, image in enumerate(images[:12]):
            writer.writerow(
                [f"P{i}", f"Item {i}", ["bags", "hats"][i % 2], f"{100 + i}.00", "USD", str(image)]
            )
    return {
        "ckpt": ckpt,
        "data": data,
        "file": root / "notes.txt",
        "dir": root / "mine",
        "bad_yaml": root / "bad.yaml",
        "predictions": root / "predictions.jsonl",
        "csv": root / "table.csv",
        "bomb_data": bomb_data,
        "bomb_image": bomb_image,
        "root": root,
    }


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_is_one_error_line_and_damages_nothing(name, workspace, tmp_path):
    case = CASES[name]
    values = {key: str(path) for key, path in workspace.items()} | {"tmp": str(tmp_path)}
    args = [arg.format(**values) for arg in case.args]
    before = snapshot(workspace["root"])
    script = os.path.join(os.path.dirname(sys.executable), "phivision")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **case.env}
    preexec = _limit_file_size(case.file_size_limit) if case.file_size_limit else None
    done = subprocess.run(
        [script, *args], capture_output=True, text=True, env=env, timeout=300, preexec_fn=preexec
    )

    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "np.float64(" not in done.stderr
    for expected in case.names:
        assert expected.format(**values) in lines[0], lines[0]
    assert snapshot(workspace["root"]) == before
    assert not [p for p in tmp_path.rglob("*.tmp")], "a temporary file was left behind"
