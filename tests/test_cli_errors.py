"""A user's mistake never traces back: a table of bad command lines and hostile inputs, each run through the real
``phivision`` command. Every row must end with exit code 2, exactly one ``error:`` line on stderr naming the flag,
file or key at fault, no traceback, no numpy repr, and every file that existed before unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image


@dataclass(frozen=True)
class Case:
    """``args`` may use {ckpt}, {data}, {file}, {dir}, {tmp}, {bad_yaml}, {predictions} and {csv}; ``names``
    must all appear in the error line (after the same substitution)."""

    args: list[str]
    names: list[str]
    file_size_limit: int | None = None  # RLIMIT_FSIZE in bytes: a disk that fills up
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[dict[str, str]], None] | None = None  # prepares {tmp} (e.g. a tampered copy of {run})


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


# ------------------------------------------------------------------------------------------ issue 20
# Tampered run files for `train --resume`: each setup copies the finished run {run} to {tmp}/run and edits it.


def _copy_run(values: dict[str, str]) -> Path:
    run = Path(values["tmp"]) / "run"
    shutil.copytree(values["run"], run)
    return run


def _edit_json(name: str, edit: Callable[[object], object]) -> Callable[[dict[str, str]], None]:
    def setup(values: dict[str, str]) -> None:
        path = _copy_run(values) / "checkpoints" / "step-2" / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return setup


def _set(key: str, value: object) -> Callable[[dict], dict]:
    return lambda data: {**data, key: value}


def _negative_second_moments(values: dict[str, str]) -> None:
    from safetensors.torch import load_file, save_file

    path = _copy_run(values) / "checkpoints" / "step-2" / "optimizer.safetensors"
    tensors = load_file(str(path))
    tensors = {k: -t.abs() - 1 if k.endswith("exp_avg_sq") else t for k, t in tensors.items()}
    save_file(tensors, str(path))


def _step_dir_named(name: str) -> Callable[[dict[str, str]], None]:
    def setup(values: dict[str, str]) -> None:
        run = _copy_run(values)
        shutil.copytree(run / "checkpoints" / "step-2", run / "checkpoints" / name)

    return setup


def _labels(count: int) -> Callable[[dict[str, str]], None]:
    """{tmp}/run recording ``count`` categories (long invented names, as a big catalog has)."""

    def setup(values: dict[str, str]) -> None:
        import random

        rng = random.Random(0)
        names = {"".join(rng.choice("abcdefghij klmnop") for _ in range(60)).strip() for _ in range(count)}
        labels = {"categories": sorted(n for n in names if n), "currency": "USD"}
        (_copy_run(values) / "labels.json").write_text(json.dumps(labels))

    return setup


RESUME = ["train", "--resume", "--out", "{tmp}/run", "schedule.max_steps=3"]
CASES |= {
    # case 2: --overwrite never destroys a source inside --out
    "prepare --overwrite from the dataset's own catalog": Case(
        ["prepare", "--source", "{data}/catalog.parquet", "--out", "{data}", "--overwrite", "--no-progress"],
        ["{data}/catalog.parquet"],
    ),
    "prepare --overwrite from the dataset directory itself": Case(
        ["prepare", "--source", "{data}", "--out", "{data}", "--overwrite", "--allow-local", "--no-progress"],
        ["{data}"],
    ),
    # case 12: a full disk (RLIMIT_FSIZE: write(2) fails with EFBIG mid-file) during export or a checkpoint
    "a full disk during export": Case(
        ["export", "--run", "{run}", "--out", "{tmp}/export"], ["{tmp}/export"], file_size_limit=200_000
    ),
    "a full disk during a training checkpoint": Case(
        [
            "train",
            "--out",
            "{tmp}/run2",
            "--data",
            "{data}",
            "--model",
            "{ckpt}",
            "schedule.max_steps=2",
            "checkpoint.every_steps=1",
            "eval.max_samples=2",
            "eval.gen_samples=0",
        ],
        ["{tmp}/run2/checkpoints/step-1", "File too large"],
        file_size_limit=100_000,
    ),
    # case 13: tampered checkpoint state on --resume, an empty catalog, a NUL byte, too many categories
    "train --resume: tampered RNG state": Case(
        RESUME, ["rng-0.json"], setup=_edit_json("rng-0.json", _set("python", "x"))
    ),
    "train --resume: tampered best_metric": Case(
        RESUME,
        ["trainer_state.json", "best_metric"],
        setup=_edit_json("trainer_state.json", _set("best_metric", "x")),
    ),
    "train --resume: tampered history": Case(
        RESUME,
        ["trainer_state.json", "history"],
        setup=_edit_json("trainer_state.json", _set("history", [1, 2])),
    ),
    "train --resume: tampered scheduler": Case(
        RESUME, ["scheduler.json", "last_epoch"], setup=_edit_json("scheduler.json", _set("last_epoch", "x"))
    ),
    "train --resume: tampered optimizer hyperparameter": Case(
        RESUME,
        ["optimizer.json", "lr"],
        setup=_edit_json(
            "optimizer.json", lambda d: {**d, "param_groups": [{**g, "lr": "x"} for g in d["param_groups"]]}
        ),
    ),
    "train --resume: negative optimizer second moments": Case(
        RESUME, ["optimizer.safetensors", "exp_avg_sq"], setup=_negative_second_moments
    ),
    # case 14: nonsense checkpoint steps
    "train --resume: a checkpoint folder named step 10^20": Case(
        RESUME, ["step-100000000000000000000"], setup=_step_dir_named("step-100000000000000000000")
    ),
    "train --resume: a negative checkpoint step": Case(
        RESUME, ["trainer_state.json", "step"], setup=_edit_json("trainer_state.json", _set("step", -5))
    ),
    "sample --like an empty catalog": Case(
        ["sample", "--like", "{empty_data}", "--out", "{tmp}/s"],
        ["{empty_data}/catalog.parquet", "no products"],
    ),
    "inspect a catalog with a NUL byte in image_path": Case(
        ["inspect", "{nul_data}", "--out", "{tmp}/inspect.html", "--no-progress"],
        ["{nul_data}/catalog.parquet", "row 3", "NUL"],
    ),
    "predict constrained to more categories than the grammar holds": Case(
        ["predict", "{image}", "--model", "{tmp}/run", "--constrain"],
        ["categories", "--no-constrain"],
        setup=_labels(600_000),
    ),
    # case 3: the server's own bounds are flags like any other, checked before the model loads
    "serve --header-timeout 0": Case(
        ["serve", "--model", "{ckpt}", "--header-timeout", "0"], ["--header-timeout 0"]
    ),
    "serve --max-connections 0": Case(
        ["serve", "--model", "{ckpt}", "--max-connections", "0"], ["--max-connections 0"]
    ),
    # case 7: an output path that is one of the command's inputs (or another of its outputs) is refused
    "inspect --out the catalog": Case(
        ["inspect", "{data}", "--out", "{data}/catalog.parquet", "--no-progress"],
        ["--out {data}/catalog.parquet", "the catalog"],
    ),
    "inspect --out an image of the dataset": Case(
        ["inspect", "{data}", "--out", "{image}", "--no-progress"],
        ["--out {image}", "the image of catalog row 2"],
    ),
    "inspect --out a .json (the page and its JSON one file)": Case(
        ["inspect", "{data}", "--out", "{tmp}/page.json", "--no-progress"], ["{tmp}/page.json", "also --out"]
    ),
    "predict --out the photo it reads": Case(
        ["predict", "{image}", "--model", "{ckpt}", "--out", "{image}"], ["--out {image}", "the image"]
    ),
    "predict --out a file of the model": Case(
        ["predict", "{image}", "--model", "{ckpt}", "--out", "{ckpt}/config.json"], ["--out", "config.json"]
    ),
    "report --predictions P --out P": Case(
        [
            "report",
            "--predictions",
            "{evaluation}/predictions.jsonl",
            "--out",
            "{evaluation}/predictions.jsonl",
        ],
        ["--out {evaluation}/predictions.jsonl", "--predictions"],
    ),
    "report --out the metrics beside the predictions": Case(
        ["report", "--predictions", "{evaluation}", "--out", "{evaluation}/metrics.json"],
        ["--out {evaluation}/metrics.json", "the metrics beside --predictions"],
    ),
    "evaluate --out the model's config": Case(
        ["evaluate", "--model", "{ckpt}", "--data", "{data}", "--out", "{ckpt}/config.json"],
        ["--out {ckpt}/config.json", "--model"],
    ),
    "evaluate --out the catalog's directory as metrics.json beside": Case(
        ["evaluate", "--model", "{ckpt}", "--data", "{data}", "--out", "{data}/prepare_report.json"],
        ["--out {data}/prepare_report.json", "the dataset's report"],
    ),
    "sample --urls-out the catalog it writes": Case(
        ["sample", "--out", "{tmp}/s", "--n", "6", "--urls-out", "{tmp}/s/catalog.parquet"],
        ["--urls-out {tmp}/s/catalog.parquet", "the catalog in --out"],
    ),
    "train --out the dataset": Case(
        ["train", "--out", "{data}", "--data", "{data}", "--model", "{ckpt}", "schedule.max_steps=1"],
        ["--out {data}", "--data"],
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
    catalog = pd.read_parquet(bomb_data / "catalog.parquet")
    bomb_image = catalog.loc[catalog["split"] == "train", "image_path"].iloc[0]
    (bomb_data / bomb_image).unlink()
    Image.new("L", (20_000, 20_000)).save(bomb_data / bomb_image, format="PNG")  # 400 Mpx in a small file
    (root / "predictions.jsonl").write_text('{"image": "a.jpg", "answer": "Product: x"}\n')
    run = _finished_run(root, ckpt, data)
    evaluation = root / "evaluation"
    done = subprocess.run(
        [
            _script(),
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(data),
            "--out",
            str(evaluation),
            "--limit",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    nul_data, empty_data, hostile_data = root / "nul_data", root / "empty_data", root / "hostile_data"
    for copy in (nul_data, empty_data, hostile_data):
        shutil.copytree(sample_dataset, copy)
    table = pd.read_parquet(nul_data / "catalog.parquet")
    table.loc[1, "image_path"] = "images/a\x00b.jpg"
    if "image_paths" in table.columns:  # the photo list says the same (image_path is its first photo)
        table.at[1, "image_paths"] = ["images/a\x00b.jpg"]
    table.to_parquet(nul_data / "catalog.parquet")
    pd.read_parquet(empty_data / "catalog.parquet").iloc[:0].to_parquet(empty_data / "catalog.parquet")
    hostile = _plant_hostile_images(hostile_data)
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
        "run": run,
        "evaluation": evaluation,
        "nul_data": nul_data,
        "empty_data": empty_data,
        "hostile_data": hostile_data,
        "image": data / catalog["image_path"].iloc[0],
        **hostile,
        "root": root,
    }


def _finished_run(root: Path, ckpt: Path, data: Path) -> Path:
    """A 2-step LoRA run with a checkpoint per step (absolute paths, so copies of it resume anywhere)."""
    run = root / "run"
    args = [
        "train",
        "--out",
        str(run),
        "--data",
        str(data),
        "--model",
        str(ckpt),
        "schedule.max_steps=2",
        "checkpoint.every_steps=1",
        "eval.max_samples=2",
        "eval.gen_samples=0",
        "data.batch_size=2",
    ]
    done = subprocess.run([_script(), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _plant_hostile_images(dataset: Path) -> dict[str, Path]:
    """Replace four images of ``dataset``: a FIFO, a symlink to /dev/zero, a 400-megapixel PNG (a small file)
    and an EPS file (Pillow would hand it to Ghostscript)."""
    paths = [dataset / p for p in pd.read_parquet(dataset / "catalog.parquet")["image_path"].iloc[:4]]
    for path in paths:
        path.unlink()
    os.mkfifo(paths[0])
    paths[1].symlink_to("/dev/zero")
    Image.new("L", (20_000, 20_000)).save(paths[2], format="PNG")
    paths[3].write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto showpage\n")
    return {"fifo": paths[0], "zero_link": paths[1], "bomb_400mpx": paths[2], "eps": paths[3]}


def _script() -> str:
    return os.path.join(os.path.dirname(sys.executable), "phivision")


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
    if case.setup is not None:
        case.setup(values)
    before = snapshot(workspace["root"])
    script = _script()
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


# ------------------------------------------------------------------- hostile input that is not an error
# Issue 20: input that phivision must answer, not refuse: a cut last line, files that are no image (a FIFO, a
# link to /dev/zero, a 400-megapixel bomb, EPS), a killed export's leftovers, 100,000 categories. Each run ends
# in time with the documented exit code and message, no traceback, and nothing of the user's changed.


@dataclass(frozen=True)
class Answered:
    args: list[str]
    code: int
    says: list[str]  # substrings of stdout + stderr (after substitution)
    setup: Callable[[dict[str, str]], None] | None = None
    check: Callable[[dict[str, str]], None] | None = None


def _cut_metrics_log(values: dict[str, str]) -> None:
    path = _copy_run(values) / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[:-15])  # the last record cut mid-line, as by a kill


def _killed_export(values: dict[str, str]) -> None:
    (Path(values["tmp"]) / ".export.0123abcd.tmp" / "part").mkdir(parents=True)


def _inspect_reasons(values: dict[str, str]) -> None:
    found = json.loads((Path(values["tmp"]) / "inspect.json").read_text())
    reasons = {r["image_path"]: r["reason"] for r in found["outliers"]["unreadable_examples"]}
    data = Path(values["hostile_data"])
    expected = {"fifo": "not_a_file", "zero_link": "not_a_file", "bomb_400mpx": "too_many_pixels"}
    expected["eps"] = "unsupported_format"
    assert reasons == {str(Path(values[k]).relative_to(data)): v for k, v in expected.items()}


def _answer_in_categories(values: dict[str, str]) -> None:
    labels = json.loads((Path(values["tmp"]) / "run" / "labels.json").read_text())["categories"]
    answer = json.loads((Path(values["tmp"]) / "answers.jsonl").read_text())
    assert answer["category"] in set(labels), answer


ANSWERED = {
    "train --resume after a cut last line of metrics.jsonl": Answered(
        RESUME, 0, ["warning: {tmp}/run/metrics.jsonl line", "cut short"], setup=_cut_metrics_log
    ),
    "inspect images that are a FIFO, a link to /dev/zero, a 400-Mpx bomb and EPS": Answered(
        ["inspect", "{hostile_data}", "--out", "{tmp}/inspect.html", "--no-progress"],
        0,
        ["inspected 60 rows"],
        check=_inspect_reasons,
    ),
    "sample --like a dataset with a FIFO and a link to /dev/zero as images": Answered(
        ["sample", "--like", "{hostile_data}", "--out", "{tmp}/s"], 0, ["wrote 60 synthetic products"]
    ),
    "predict an EPS file": Answered(
        ["predict", "{eps}", "--model", "{run}"], 1, ["unsupported_format", "EPS"]
    ),
    "export after a killed export left its temporary folder": Answered(
        ["export", "--run", "{run}", "--out", "{tmp}/export"],
        0,
        ["warning: removed {tmp}/.export.0123abcd.tmp"],
        setup=_killed_export,
        check=lambda values: (Path(values["tmp"]) / "export" / "config.json").is_file(),
    ),
    "predict constrained to 100,000 categories": Answered(
        ["predict", "{image}", "--model", "{tmp}/run", "--constrain", "--out", "{tmp}/answers.jsonl"],
        0,
        ["wrote 1 line(s)"],
        setup=_labels(100_000),
        check=_answer_in_categories,
    ),
}


@pytest.mark.parametrize("name", list(ANSWERED))
def test_hostile_input_is_answered_in_time_and_damages_nothing(name, workspace, tmp_path):
    case = ANSWERED[name]
    values = {key: str(path) for key, path in workspace.items()} | {"tmp": str(tmp_path)}
    if case.setup is not None:
        case.setup(values)
    before = snapshot(workspace["root"])
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    args = [arg.format(**values) for arg in case.args]
    done = subprocess.run([_script(), *args], capture_output=True, text=True, env=env, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == case.code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for expected in case.says:
        assert expected.format(**values) in output, output[-3000:]
    if case.check is not None:
        case.check(values)
    assert snapshot(workspace["root"]) == before
    assert not [p for p in tmp_path.rglob("*.tmp")], "a temporary file was left behind"
