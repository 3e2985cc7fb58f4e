"""The command line itself: light start-up, help for every verb, -h, --version, shell completion, and one
``error:`` line for a mistyped command line or an OSError the user can act on."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
import typer

from phivision.cli import app, main, os_error_message

VERBS = sorted(typer.main.get_command(app).commands)
HEAVY = ("torch", "transformers", "pandas", "numpy", "PIL", "httpx", "fastapi", "uvicorn", "datasets", "yaml")


def phivision(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "phivision")
    return subprocess.run([script, *args], capture_output=True, text=True, env=env, timeout=120)


def test_import_and_every_help_load_nothing_heavy():
    code = (
        "import sys\n"
        "import phivision\n"
        f"light = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "from phivision.cli import app, main\n"
        "import typer\n"
        "for args in [['--help'], ['-h'], ['--version'], *([v, '--help'] for v in "
        "typer.main.get_command(app).commands)]:\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (args, exit.code)\n"
        f"print(light, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[] []"


def test_help_h_and_version():
    full = phivision("--help")
    assert full.returncode == 0 and full.stderr == ""
    for verb in VERBS:
        assert verb in full.stdout
    assert phivision("-h").stdout == full.stdout
    shown = phivision("--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"phivision {version('phivision')}"
    bare = phivision()
    assert bare.returncode == 0 and "Usage: phivision" in bare.stdout + bare.stderr


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_explains_itself(verb, capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, flag])
        assert exit_info.value.code == 0
        shown = capsys.readouterr().out
        assert shown.startswith(f"Usage: phivision {verb} [OPTIONS]")
        assert "-h, --help" in shown


def test_shell_completion():
    script = phivision("--show-completion", "bash")
    assert script.returncode == 0 and "_PHIVISION_COMPLETE" in script.stdout
    env = {
        **os.environ,
        "_PHIVISION_COMPLETE": "complete_bash",
        "COMP_WORDS": "phivision de",
        "COMP_CWORD": "1",
    }
    assert "demo" in phivision(env=env).stdout.split()
    env.update(COMP_WORDS="phivision serve --max-n", COMP_CWORD="2")
    assert "--max-new-tokens" in phivision(env=env).stdout.split()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["sample", "--out", "x", "--n", "many"], "--n"),
        (["sample"], "--out"),
        (["serve", "--model", "m", "--no-such-flag"], "--no-such-flag"),
        (["trian"], "trian"),
    ],
)
def test_a_mistyped_command_line_is_one_error_line(args, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err


# -------------------------------------------------------------------------------------- the OSError net


def test_environment_errors_are_one_line_anywhere():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/catalog.parquet")
    assert os_error_message(full, []) == "/data/out/catalog.parquet: No space left on device"
    unnamed = OSError(errno.ENOSPC, "No space left on device")  # a failed write() does not know its file
    assert os_error_message(unnamed, []).startswith("No space left on device")
    assert os_error_message(OSError(errno.EFBIG, "File too large", "x"), []) == "x: File too large"
    arrow = OSError("[errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert os_error_message(arrow, []) is not None


def test_path_errors_are_one_line_only_on_a_path_the_user_gave(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), f"data.path={tmp_path / 'data'}"]
    denied = PermissionError(errno.EACCES, "Permission denied", str(out / "checkpoints" / "step-1"))
    assert os_error_message(denied, args) == f"{out / 'checkpoints' / 'step-1'}: Permission denied"
    inside_override = FileNotFoundError(
        errno.ENOENT, "No such file or directory", str(tmp_path / "data" / "x")
    )
    assert os_error_message(inside_override, args) is not None
    # phivision's own files (or anything else the user did not name) may be a bug: keep the traceback
    own = FileNotFoundError(
        errno.ENOENT, "No such file or directory", os.path.join(sys.prefix, "lib", "x.py")
    )
    assert os_error_message(own, args) is None
    # shares a prefix with --out only
    sibling = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs"))
    assert os_error_message(sibling, args) is None
    assert os_error_message(ConnectionResetError(errno.ECONNRESET, "reset"), args) is None
    renamed = IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path / ".r.tmp"), None, str(out))
    assert os_error_message(renamed, args) == f"{tmp_path / '.r.tmp'} -> {out}: Is a directory"
    parent = PermissionError(errno.EACCES, "Permission denied", str(tmp_path))  # creating --out in it failed
    assert os_error_message(parent, args) == f"{tmp_path}: Permission denied"


def test_a_path_error_on_a_given_path_is_one_line_end_to_end(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = phivision("tiny", "--out", str(blocker / "tiny"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert str(blocker) in done.stderr and "Traceback" not in done.stderr
    assert blocker.read_text() == "not a directory"


def test_a_bug_keeps_its_traceback(tmp_path):
    code = (
        "import phivision.api as api\n"
        "from phivision.cli import main\n"
        "def broken(*a, **k):\n"
        "    raise KeyError('a bug')\n"
        "api.tiny = broken\n"
        f"main(['tiny', '--out', {str(tmp_path / 't')!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError: 'a bug'" in done.stderr
