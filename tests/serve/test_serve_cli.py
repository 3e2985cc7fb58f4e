"""`phivision serve` flags: every bad value stops with one `error:` line naming the flag, exit code 2, before the
model loads; and the real command, started as users start it, answers on loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServeCommand, free_port

from cli_helpers import run_cli
from phivision.args import MAX_PIXELS as SERVE_MAX_PIXELS
from phivision.args import ServeLimits
from phivision.data.images import DEFAULT_MAX_PIXELS
from phivision.errors import PhivisionError
from phivision.serve.limits import allowed_hosts, check_bind


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--port", "99999"], "--port"),
        (["--port", "0"], "--port"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-wait-ms", "-1"], "--max-wait-ms"),
        (["--max-wait-ms", "nan"], "--max-wait-ms"),
        (["--max-upload-mb", "0"], "--max-upload-mb"),
        (["--max-pixels", "-5"], "--max-pixels"),
        (["--max-batch-pixels", "0"], "--max-batch-pixels"),
        (["--max-queue", "0"], "--max-queue"),
        (["--max-queue-mb", "inf"], "--max-queue-mb"),
        (["--body-timeout", "0"], "--body-timeout"),
        (["--answer-timeout", "-3"], "--answer-timeout"),
        (["--remote-image-timeout", "0"], "--remote-image-timeout"),
        (["--allow-private-image-hosts"], "--allow-private-image-hosts"),
        (["--host", "no-such-host.invalid"], "--host"),
        (["--host", "999.1.1.1"], "--host"),
        (["--device", "gpu:7"], "--device"),
    ],
)
def test_bad_serve_flag_is_one_error_line_before_the_model_loads(
    capsys, tmp_path: Path, flags, named
) -> None:
    # The model path does not exist: had the model been loaded first, the error would name it instead.
    port = [] if "--port" in flags else ["--port", str(free_port())]
    code, _, err = run_cli(capsys, "serve", "--model", str(tmp_path / "no-model"), *port, *flags)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert named in err and "no-model" not in err, err


def test_port_in_use_is_reported_before_the_model_loads(capsys, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "--model", str(tmp_path / "no-model"), "--port", str(port))
    assert code == 2 and "--port" in err and "cannot listen" in err, err


def test_limits_validate_and_defaults_agree_with_the_image_loader() -> None:
    assert SERVE_MAX_PIXELS == DEFAULT_MAX_PIXELS
    assert ServeLimits().validate() == ServeLimits()
    with pytest.raises(PhivisionError, match="--max-new-tokens"):
        ServeLimits(max_new_tokens=0).validate()
    with pytest.raises(PhivisionError, match="--max-queue 2.5: expected a whole number"):
        ServeLimits(max_queue=2.5).validate()
    with pytest.raises(PhivisionError, match="--port"):
        check_bind("127.0.0.1", 70000)


def test_allowed_hosts_follow_the_bind_address() -> None:
    assert allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("::1", ["Photos.Example"]) == {"localhost", "127.0.0.1", "::1", "photos.example"}
    assert allowed_hosts("0.0.0.0") is None  # every interface: Host is the reverse proxy's business
    assert allowed_hosts("0.0.0.0", ["photos.example"]) == {"photos.example"}


def test_serve_command_answers_on_loopback(tiny_checkpoint: Path) -> None:
    flags = ["--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--max-queue", "3"]
    with ServeCommand(*flags) as serve:
        models = httpx.get(f"{serve.url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [str(tiny_checkpoint)]  # the id defaults to --model
        assert httpx.get(f"{serve.url}/healthz", headers={"Host": "attacker.example"}).status_code == 400
