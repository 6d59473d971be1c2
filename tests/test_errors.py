"""The one error policy: a user error is one `higgs-ds: error:` line naming what is wrong and exit 2, a failed
check exit 1, and `--help` says so; the same from every entry point."""

import json
import subprocess
import sys

import pytest

from higgs_ds import cli


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("higgs-ds: error:")]


@pytest.mark.parametrize(
    "argv, names",
    [
        (["shards", "build", "{tmp}/no-such.jsonl", "--out", "{tmp}/out", "--codec", "tiny"], "no-such.jsonl"),
        (["shards", "verify", "{tmp}/empty"], "empty"),
        (["shards", "build", "{tmp}/m.jsonl", "--out", "{tmp}/o", "--codec", "tiny", "--slice", "3/2"], "--slice"),
        (["export", "{tmp}/no-run", "--out", "{tmp}/exported"], "no-run"),
        (["train", "{tmp}/no-config.toml"], "no-config.toml"),
        (["preflight", "{tmp}/no-config.toml"], "no-config.toml"),
    ],
)
def test_user_errors_exit_2_with_one_line_naming_the_input(tmp_path, capsys, argv, names):
    (tmp_path / "empty").mkdir()
    code = cli.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and names in lines[0], err
    assert "Traceback" not in err


def test_exit_codes_are_documented_in_help():
    helps = [cli.parser().format_help()]
    for sub in (["train", "--help"],):
        run = subprocess.run([sys.executable, "-m", "higgs_ds.cli", *sub], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        helps.append(run.stdout)
    for text in helps:
        flat = " ".join(text.split())
        assert "exit codes: 0 success; 1 a check found a problem" in flat and "2 a user error" in flat, text


def test_a_real_process_exits_2_and_prints_no_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "higgs_ds.cli", "shards", "verify", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert _error_lines(run.stderr) and str(tmp_path / "missing") in run.stderr and "Traceback" not in run.stderr


def test_a_failed_check_exits_1(tmp_path, capsys, small_shards):
    """`shards verify` on a shard set with one corrupted shard: the check ran and failed -> 1, naming the shard."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    index = json.loads((shards / "index.json").read_text())
    bad = shards / index["shards"][0]["file"]
    data = bytearray(bad.read_bytes())
    data[-2000] ^= 0xFF  # one flipped byte inside the last member: the sha256 no longer matches
    bad.write_bytes(bytes(data))
    code = cli.main(["shards", "verify", str(shards)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert bad.name in err
