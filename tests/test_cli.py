"""The CLI tells a user's mistake in one line, with no traceback; anything else is a bug and
keeps its traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from data_shards.errors import ValleyForgeError
from launch import cli
from launch.submit import JobServerError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def valleyforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def raising(error: BaseException):
    def command(args):
        raise error

    return command


def test_a_user_error_is_one_line_without_traceback(tmp_path):
    result = valleyforge("shards", "verify", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"valleyforge: error: {tmp_path / 'nothing'}: not found (expected a split "
        f"directory holding manifest.json, a shard file, a glob or brace range of "
        f"shards, or a URL)"
    ], result.stderr


@pytest.mark.parametrize(
    "error, exit_code",
    [
        (ValleyForgeError("data/x: manifest lists no shards"), 2),
        (JobServerError("cannot reach a Ray job server at http://h:8265"), 1),
    ],
)
def test_user_errors_print_their_line_and_exit_code(monkeypatch, capsys, error, exit_code):
    monkeypatch.setitem(cli.SHARD_COMMANDS, "verify", raising(error))
    assert cli.main(["shards", "verify", "data/x"]) == exit_code
    assert capsys.readouterr().err == f"valleyforge: error: {error}\n"


@pytest.mark.parametrize(
    "bug",
    [
        TypeError("a bug"),
        AttributeError("a bug"),
        ValueError("a library's complaint"),
        RuntimeError("torch's complaint"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_else_propagates(monkeypatch, bug):
    monkeypatch.setitem(cli.SHARD_COMMANDS, "verify", raising(bug))
    with pytest.raises(type(bug)) as raised:
        cli.main(["shards", "verify", "data/x"])
    assert raised.value is bug


def test_a_bug_shows_its_traceback():
    script = (
        "import sys\nfrom launch import cli\n"
        "def verify(args):\n    raise TypeError('a bug in a command')\n"
        "cli.SHARD_COMMANDS['verify'] = verify\nsys.exit(cli.main(['shards', 'verify', 'data/x']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "TypeError: a bug in a command"
    assert "valleyforge: error" not in result.stderr
