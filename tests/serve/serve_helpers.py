"""Builders for tiny RUN directories (made here, not by the training code, in the layout of docs/ARCHITECTURE.md)
and test images."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn
import yaml
from PIL import Image

from phivision.answer.prompt import PromptFormat

# A question other than the default, so tests can see the run's prompt travel through load_model and export.
RUN_PROMPT = PromptFormat(question="Which product is this?")
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def write_config(run: Path, model: str, method: str) -> None:
    config = {"model": model, "method": method, "prompt": RUN_PROMPT.to_dict(), "seed": 0}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def make_lora_run(base: Path, run: Path, model_field: str | None = None) -> Path:
    """RUN/adapter (random non-zero LoRA, so the merged weights differ from the base), RUN/processor, config."""
    from peft import LoraConfig, get_peft_model

    from phivision.model import Phi3VForCausalLM, Phi3VProcessor

    model = Phi3VForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
        )
    run.mkdir(parents=True)
    peft_model.save_pretrained(run / "adapter")
    Phi3VProcessor.from_pretrained(base).save_pretrained(run / "processor")
    write_config(run, model_field or str(base), "lora")
    return run


def make_full_run(base: Path, run: Path) -> Path:
    """RUN/model: the tiny model with its weights nudged (a stand-in for full fine-tuning)."""
    from phivision.model import Phi3VForCausalLM, Phi3VProcessor

    model = Phi3VForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    run.mkdir(parents=True)
    model.save_pretrained(run / "model")
    Phi3VProcessor.from_pretrained(base).save_pretrained(run / "processor")
    write_config(run, str(base), "full")
    return run


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    image = Image.new("RGB", size, color)
    image.paste((20, 20, 160), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def forward_logits(model, processor, prompt: PromptFormat, image: Image.Image) -> torch.Tensor:
    """Logits of one prompt + image forward pass (float32), to compare two loadings of the same weights."""
    from phivision.answer.prompt import prompt_text

    batch = processor(text=prompt_text(prompt), images=[image], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread, stopped cleanly at the end."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            self.thread.join(0.05)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class ServeProcess:
    """`phivision serve --model MODEL --port <free port> EXTRA...` as users start it (a separate process), ready
    once /healthz answers 200; stopped with Ctrl-C (SIGINT) at the end."""

    def __init__(self, model: Path | str, *extra: str, env: dict[str, str] | None = None) -> None:
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (a pipe nobody reads would stall a chatty server)
        flags = ["--model", str(model), "--port", str(self.port), *extra]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "phivision.cli", "serve", *flags],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __enter__(self) -> ServeProcess:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited: {self.output()[-3000:]}")
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("serve did not answer /healthz within 120 s")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def data_url(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


TAUGHT_ANSWER = "Product: Check Cotton Shirt, Category: shirts, Full Price: 890.0"


def teach_answer(base: Path, image: Image.Image, answer: str = TAUGHT_ANSWER, steps: int = 60):
    """A tiny model trained for a few steps on one photo until greedy decoding says ``answer`` for it: a short run
    whose answers parse, so structured answers have real fields to carry. Returns a LoadedModel."""
    return teach_answers(base, [([image], answer)], steps)


def teach_answers(
    base: Path, examples: list[tuple[list[Image.Image], str]], steps: int = 60, max_images: int = 1
):
    """A tiny model trained for a few steps on ``examples`` (a product's photos, in one prompt, and its answer)
    until greedy decoding gives each answer. Returns a LoadedModel that takes ``max_images`` photos per prompt."""
    from phivision.answer.prompt import PromptFormat, prompt_text
    from phivision.model import Phi3VForCausalLM, Phi3VProcessor
    from phivision.runs import LoadedModel

    torch.manual_seed(0)
    model = Phi3VForCausalLM.from_pretrained(base, dtype=torch.float32)
    processor = Phi3VProcessor.from_pretrained(base)
    prompt = PromptFormat()
    batch = processor.collate(
        [
            processor.build_example(prompt_text(prompt, len(images)), answer, images)
            for images, answer in examples
        ]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return LoadedModel(model, processor, prompt, source="taught-tiny", max_images=max_images)


@contextmanager
def silent_host() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server on loopback that accepts every connection and never answers (a stalled image host): yields
    its port and the connections it holds (until the block ends)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1], held
    finally:
        stop.set()
        acceptor.join()
        for sock in held:
            sock.close()
        listener.close()
