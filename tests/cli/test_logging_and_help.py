"""What the command line says while it works: --version, -v/-q on every command (before or after it),
a stage line per stage with its time, progress bars silenced by -q, grouped --help with an example
per command and every option described, and a summary whose total is the command's wall time."""

import io
import logging
import os
import re
import subprocess
import sys
import time

import pytest

from graphprune.cli import main as cli
from graphprune.progress import Timings, _Spinner, configure_logging, level_for, stage

STAGES = ("load", "trace", "calibrate", "score", "allocate", "rewrite", "write")


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    configure_logging(0)


def compress(capsys, model_dir, calib, out, before=(), after=()):
    code = cli.main([*before, "compress", str(model_dir), "--criterion", "flap", "--sparsity", "0.3", "--calib",
                     str(calib), "--nsamples", "4", "--seqlen", "16", "--out", str(out), *after])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert re.match(r"graphprune \d+\.\d+\.\d+ \(Python 3\.\d+\.\d+; torch .*, transformers .*\)$",
                    capsys.readouterr().out.strip())


def test_verbose_logs_a_line_per_stage_and_quiet_logs_nothing(model_dir, calib, tmp_path, capsys):
    out, err = compress(capsys, model_dir, calib, tmp_path / "v", before=["-v"])  # -v before the command
    lines = [line for line in err.splitlines() if line.startswith("stage ")]
    assert [line.split()[1] for line in lines if line.split()[1] in STAGES] == list(STAGES), err
    assert all(re.match(r"stage \S+ +\d+\.\d\d s$", line) for line in lines), lines
    assert "debug: " in err  # -v shows debug lines too
    out, err = compress(capsys, model_dir, calib, tmp_path / "q", after=["-q"])  # -q after the command
    assert err == "" and "block 0" not in err  # no stage lines, no progress bars
    assert re.search(r"^time: startup .*, load .* total \d+\.\d\ds$", out, re.M)  # the times are in the summary still
    # without -v or -q a terminal gets the stage lines, a pipe or a log only warnings and errors
    assert level_for(0, terminal=True) == logging.INFO and level_for(0, terminal=False) == logging.WARNING
    assert level_for(-1, terminal=True) == logging.WARNING and level_for(1, terminal=False) == logging.DEBUG


def test_every_command_takes_v_and_q_and_describes_every_option_in_groups():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert set(commands) == {"inspect", "compress", "export", "eval", "bench", "criteria"}
    for name, command in commands.items():
        help_text = command.format_help()
        assert "-v, --verbose" in help_text and "-q, --quiet" in help_text, name
        assert "example" in (command.epilog or ""), name
        assert f"graphprune {name}" in command.epilog, name
        for action in command._actions:  # noqa: SLF001
            assert action.help and action.help.strip(), (name, action.dest)
        titles = [g.title for g in command._action_groups if g._group_actions]  # noqa: SLF001
        assert "logging" in titles, name
    titles = [g.title for g in commands["compress"]._action_groups if g._group_actions]  # noqa: SLF001
    assert titles[1:6] == ["model", "data", "criterion", "allocation", "output"], titles
    ungrouped = [a.dest for a in commands["compress"]._action_groups[0]._group_actions]  # noqa: SLF001
    assert ungrouped == ["help"]


def test_stage_times_are_exclusive_and_nested_stages_are_named():
    timings = Timings(progress=False)
    with timings.active():
        with timings("score"):
            time.sleep(0.02)
            with stage("calibrate"):
                time.sleep(0.05)
            with stage("calibrate"):
                with stage("calibrate"):  # re-entered: counted once
                    time.sleep(0.01)
    assert timings["calibrate"] == pytest.approx(0.06, abs=0.03)
    assert timings["score"] == pytest.approx(0.02, abs=0.02)
    assert timings["score"] + timings["calibrate"] == pytest.approx(timings.elapsed(), abs=0.02)


def test_a_long_stage_without_a_bar_of_its_own_gets_one_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    spinner = _Spinner("trace", stream=screen, delay=0.05, tick=0.02)
    time.sleep(0.3)
    spinner.stop()
    assert "trace: 00:00" in screen.getvalue()
    quiet = io.StringIO()  # not a terminal: no bar
    spinner = _Spinner("trace", stream=quiet, delay=0.01, tick=0.01)
    time.sleep(0.05)
    spinner.stop()
    assert quiet.getvalue() == ""


def test_the_summary_total_is_the_wall_time_of_the_command(model_dir, calib, tmp_path):
    """No screenshot: the total the summary prints equals the wall time the caller measures, within 1 s."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "graphprune.cli", "compress", str(model_dir), "--criterion", "flap",
                             "--sparsity", "0.3", "--calib", str(calib), "--nsamples", "4", "--seqlen", "16", "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    wall = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    times = re.search(r"^time: (.*); total (\d+\.\d+)s$", result.stdout, re.M)
    total = float(times.group(2))
    assert abs(wall - total) < 1.0, (wall, result.stdout)
    stages = {part.rsplit(" ", 1)[0]: float(part.rsplit(" ", 1)[1][:-1]) for part in times.group(1).split(", ")}
    assert list(stages)[:2] == ["startup", "load"] and "write" in stages and "other" in stages
    assert sum(stages.values()) == pytest.approx(total, abs=0.05)
    assert f"in {total:.1f}s" in result.stdout
