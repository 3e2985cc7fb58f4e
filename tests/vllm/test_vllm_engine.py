"""The real vLLM engine serves a phivision export and answers with phivision's greedy tokens.

A stage of its own (``bash scripts/test_vllm.sh``): it needs vLLM in its own virtual environment, named by
``PHIVISION_VLLM_ENV`` (``scripts/vllm_env.sh`` builds the CPU build there); the main run skips it.

The path is a user's: a checkpoint vLLM can build (the real tokenizer and config from tests/reference, the real
CLIP geometry with 4 layers and ``layer_idx`` -22, since vLLM builds ``24 + layer_idx + 1`` CLIP layers; a
2-layer decoder with the real head size 96, so the real LongRoPE factors apply; vocabulary 32,064), weights drawn
large enough that the image and the positions decide the answer; ``phivision sample``, a short LoRA ``train``,
``export``; then ``vllm serve EXPORT --trust-remote-code`` and the official ``openai`` client.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

VLLM_ENV = os.environ.get("PHIVISION_VLLM_ENV", "")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        not (Path(VLLM_ENV) / "bin" / "vllm").is_file(),
        reason="the vLLM stage: bash scripts/test_vllm.sh (PHIVISION_VLLM_ENV names vLLM's environment)",
    ),
]

REFERENCE = Path(__file__).parents[1] / "reference" / "phi-3-vision-128k-instruct"
NUM_CROPS = 4
MAX_NEW_TOKENS = 12
# vLLM uses LongRoPE's long factors for every prompt once max_model_len exceeds original_max_position_embeddings
# (4096), transformers only for sequences longer than 4096: at 4096 both use the short factors.
MAX_MODEL_LEN = 4096
# normal(0, 0.3) weights: large enough that the image and the positions change the greedy tokens
# (test_the_image_and_the_positions_decide_the_answer), with top-2 logit margins far above float32 noise.
STANDIN = {
    "std": 0.3,
    "dtype": torch.float32,
    "num_crops": NUM_CROPS,
    "hidden_size": 192,
    "num_attention_heads": 2,  # head size 96, as the real model: the real 48 LongRoPE factors
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "vision": {"num_hidden_layers": 4},
    "layer_idx": -22,  # vLLM builds 24 - 22 + 1 = 3 CLIP layers: the 3 this model reads
}
TRAIN_OVERRIDES = [
    "schedule.max_steps=3",
    "data.batch_size=2",
    "optim.lr=1e-3",
    "eval.gen_samples=0",
    "eval.max_samples=2",
    "lora.dropout=0.0",
]
QUESTION = "What is shown in this image?"
# About 3,000 tokens: positions far from 0, where LongRoPE's short factors and plain RoPE part ways.
LONG_TEXT = (
    " ".join(f"item {i} costs {i * 7 % 1000} dollars;" for i in range(260)) + " Which item is cheapest?"
)
IMAGE_TOKEN_ID = 32044  # vLLM's Phi-3-V placeholder for image positions (phivision writes negative ids)
SERVER_START_SECONDS = 900


def phivision(*args: str, cwd: Path) -> None:
    """The ``phivision`` command line in a subprocess, as a user runs it; fails the test with its stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "phivision.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, f"phivision {' '.join(args)} failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def export(workdir: Path) -> Path:
    """standin checkpoint -> phivision sample -> phivision train (LoRA, 3 steps) -> phivision export."""
    from phivision.model.standin import write_standin_checkpoint

    write_standin_checkpoint(workdir / "base", REFERENCE, **STANDIN)
    phivision("sample", "--out", "data", "--n", "40", cwd=workdir)
    phivision("train", "--data", "data", "--model", "base", "--out", "run", *TRAIN_OVERRIDES, cwd=workdir)
    phivision("export", "--run", "run", "--out", "export", cwd=workdir)
    return workdir / "export"


@pytest.fixture(scope="module")
def photos(workdir: Path, export: Path) -> list[Path]:
    """Three photos of the synthetic catalog (different products, so different pixels)."""
    return sorted((workdir / "data" / "images").glob("*.jpg"))[:3]


def image_message(photo: Path, text: str = QUESTION) -> list[dict]:
    url = "data:image/jpeg;base64," + base64.b64encode(photo.read_bytes()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def text_message(text: str = LONG_TEXT) -> list[dict]:
    return [{"role": "user", "content": text}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(export: Path, workdir: Path) -> Iterator[dict]:
    """``vllm serve EXPORT --trust-remote-code`` from vLLM's own environment; stopped after the module."""
    port, log_path = free_port(), workdir / "vllm-serve.log"
    command = [
        str(Path(VLLM_ENV) / "bin" / "vllm"),
        "serve",
        str(export),
        "--trust-remote-code",
        "--dtype",
        "float32",  # the export loaded by phivision in float32 is the reference: same weights, same arithmetic
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--limit-mm-per-prompt",
        '{"image": 1}',
        "--mm-processor-kwargs",
        json.dumps({"num_crops": NUM_CROPS}),
        "--served-model-name",
        "phi3v-products",
        # Compact JSON for response_format (llguidance): a random model would otherwise spend max_tokens on the
        # whitespace a JSON grammar allows between tokens.
        "--structured-outputs-config",
        '{"backend": "guidance", "disable_any_whitespace": true}',
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache: plenty for 4,096 tokens of a 2-layer model
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PATH=f"{Path(VLLM_ENV) / 'bin'}:{env.get('PATH', '')}",
    )
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
            if time.monotonic() - started > SERVER_START_SECONDS:
                pytest.fail(
                    f"vllm serve not ready in {SERVER_START_SECONDS} s:\n{log_path.read_text()[-6000:]}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(2)
        yield {"url": url, "log": log_path, "start_seconds": time.monotonic() - started}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server: dict):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", timeout=600, max_retries=0)


def vllm_greedy(client, messages: list[dict]) -> dict:
    """vLLM's greedy answer: the prompt's ids, the generated ids and their log-probabilities."""
    reply = client.chat.completions.create(
        model="phi3v-products",
        messages=messages,
        max_tokens=MAX_NEW_TOKENS,
        temperature=0,
        logprobs=True,
        extra_body={"return_token_ids": True},  # vLLM's extension: prompt_token_ids and token_ids
    )
    choice = reply.model_dump()["choices"][0]
    return {
        "prompt_ids": reply.model_dump()["prompt_token_ids"],
        "ids": choice["token_ids"],
        "logprobs": [t["logprob"] for t in choice["logprobs"]["content"]],
        "text": reply.choices[0].message.content,
    }


@pytest.fixture(scope="module")
def phivision_model(export: Path):
    from phivision.runs import load_model

    return load_model(export, device="cpu", dtype="float32")


def chat_prompt(processor, messages: list[dict]) -> str:
    """The prompt text vLLM builds from a chat: the export's chat template, with the image tag vLLM puts on its
    own line before the text of the message."""
    content = messages[0]["content"]
    if isinstance(content, list):
        text = next(part["text"] for part in content if part["type"] == "text")
        content = f"<|image_1|>\n{text}"
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def phivision_greedy(loaded, messages: list[dict], photo: Path | None, model=None) -> dict:
    """phivision's greedy answer to the same chat: its processor, its model, transformers' generate."""
    processor = loaded.processor
    images = [Image.open(photo).convert("RGB")] if photo is not None else None
    # vLLM tokenizes a text-only chat prompt as the template renders it, without BOS (the template has none);
    # with an image its Phi-3-V code re-tokenizes every chunk with BOS, as phivision's processor does.
    inputs = processor(
        text=chat_prompt(processor, messages), images=images, add_special_tokens=photo is not None
    )
    with torch.no_grad():
        out = (model or loaded.model).generate(
            **inputs,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=processor.stop_token_ids,
            pad_token_id=processor.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = [torch.log_softmax(step[0], -1)[i].item() for step, i in zip(out.logits, ids, strict=False)]
    prompt = [IMAGE_TOKEN_ID if i < 0 else i for i in inputs["input_ids"][0].tolist()]
    return {"prompt_ids": prompt, "ids": ids, "logprobs": logprobs}


@pytest.fixture(scope="module")
def prompts(photos: list[Path]) -> list[tuple[str, list[dict], Path | None]]:
    """Three photos and a ~3,000-token text-only prompt."""
    cases = [(f"photo {p.name}", image_message(p), p) for p in photos]
    return [*cases, ("text only", text_message(), None)]


def test_vllm_answers_with_phivisions_greedy_tokens(server, client, phivision_model, prompts):
    assert client.models.list().data[0].id == "phi3v-products"
    rows = []
    for name, messages, photo in prompts:
        theirs, ours = vllm_greedy(client, messages), phivision_greedy(phivision_model, messages, photo)
        gap = max(abs(a - b) for a, b in zip(theirs["logprobs"], ours["logprobs"], strict=False))
        rows.append((name, theirs, ours, gap))
        print(
            f"{name:>18}: {len(ours['prompt_ids'])} prompt tokens, tokens equal: {theirs['ids'] == ours['ids']}, "
            f"largest log-prob gap {gap:.1e}, vLLM's text {theirs['text'][:40]!r}"
        )
    print(f"vllm serve ready in {server['start_seconds']:.0f} s")
    for name, theirs, ours, gap in rows:
        assert theirs["prompt_ids"] == ours["prompt_ids"], f"{name}: vLLM's prompt differs from phivision's"
        assert theirs["ids"] == ours["ids"], f"{name}: vLLM's greedy tokens differ from phivision's"
        assert len(theirs["ids"]) == MAX_NEW_TOKENS  # no early stop: every step compared
        assert theirs["text"]  # the client got an answer
        # Measured here: 2e-3 at most (vLLM's CPU kernels, float32); plain RoPE moved them by up to 0.42.
        assert gap < 1e-2, f"{name}: log-probabilities differ by {gap}"
    long_prompt = len(rows[-1][2]["prompt_ids"])
    assert 2500 < long_prompt <= MAX_MODEL_LEN - MAX_NEW_TOKENS


def test_the_image_and_the_positions_decide_the_answer(phivision_model, prompts):
    """The comparison above could not miss a wrong image or a wrong rope: each photo gives its own tokens, and
    the same weights with plain RoPE (what vLLM ran when the config exposed no rope_parameters) answer
    differently."""
    from phivision.model import Phi3VConfig, Phi3VForCausalLM

    answers = {name: phivision_greedy(phivision_model, m, p)["ids"] for name, m, p in prompts}
    image_answers = [ids for name, ids in answers.items() if name.startswith("photo")]
    assert len({tuple(ids) for ids in image_answers}) == len(image_answers)

    model = phivision_model.model
    plain = Phi3VConfig.from_dict({**model.config.to_dict(), "rope_scaling": None, "rope_parameters": None})
    assert plain.rope["rope_type"] == "default"
    plain_model = Phi3VForCausalLM(plain).eval()
    plain_model.load_state_dict(model.state_dict())
    changed = [
        name
        for name, m, p in prompts
        if phivision_greedy(phivision_model, m, p, plain_model)["ids"] != answers[name]
    ]
    assert "text only" in changed and len(changed) >= 2, changed


def test_json_schema_request_returns_the_schemas_keys(client, photos, export):
    categories = json.loads((export / "phivision.json").read_text())["labels"]["categories"]
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 24},
            "category": {"type": "string", "enum": categories},
            "price": {"type": "integer", "minimum": 0, "maximum": 99999},
        },
        "required": ["title", "category", "price"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="phi3v-products",
        messages=image_message(photos[0]),
        max_tokens=96,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "product", "schema": schema}},
    )
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"title", "category", "price"}
    assert answer["category"] in categories
    assert isinstance(answer["price"], int) and 0 <= answer["price"] <= 99999
    assert isinstance(answer["title"], str) and len(answer["title"]) <= 24


def test_the_export_carries_the_lora_update_and_no_attention_request(export, workdir):
    from safetensors import safe_open

    name = "model.layers.0.self_attn.qkv_proj.weight"
    with (
        safe_open(export / "model.safetensors", "pt") as merged,
        safe_open(workdir / "base" / "model.safetensors", "pt") as base,
    ):
        assert not torch.equal(merged.get_tensor(name), base.get_tensor(name))  # the adapter was merged
    config = json.loads((export / "config.json").read_text())
    assert "_attn_implementation" not in config
    assert config["rope_parameters"]["rope_type"] == "longrope"
