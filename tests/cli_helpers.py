"""Run the `phivision` command line in-process (a subprocess would pay the package import again)."""

from __future__ import annotations

import sys


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``phivision ARGS`` through ``cli.main``: (exit code, stdout, stderr)."""
    from phivision.cli import main

    argv = sys.argv
    sys.argv = ["phivision", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err
