"""How a failed command must look to a user: a non-zero exit, the file or key named, no
Python traceback (the hostile-input suite and the command-line unit tests)."""

from __future__ import annotations

import subprocess


def assert_clean_failure(result: subprocess.CompletedProcess, *names: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert "Task was destroyed" not in output and "never retrieved" not in output, output
    for name in names:
        assert name in output, f"{name!r} not named in:\n{output}"
    return output


def assert_one_line(result: subprocess.CompletedProcess, *names: str) -> str:
    """A cmds-ad command's failure: one line, naming what it must."""
    output = assert_clean_failure(result, *names)
    assert len(output.strip().splitlines()) == 1 and output.startswith("error: "), output
    return output
