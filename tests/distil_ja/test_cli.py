"""distil_ja/cli.py: the exit-code table, the one error line, the command wrapper."""

import pytest

from distil_ja import cli
from distil_ja.cli import DataError, TrainingError, UsageError, WorkerError


@pytest.mark.parametrize("message, expected", [
    ("first\nsecond\nthird", "first"),
    ("\n\n  indented first  \nsecond", "indented first"),
    ("", "ValueError"),
    ("  \n\t\n ", "ValueError"),
])
def test_first_line(message, expected):
    assert cli.first_line(ValueError(message)) == expected


def raiser(err):
    def run(argv):
        raise err
    return run


@pytest.mark.parametrize("err, status, line", [
    (DataError("data.pickle: truncated\nmore detail"), 1, "error: data.pickle: truncated"),
    (UsageError("--batch_size must be positive"), 2, "error: --batch_size must be positive"),
    (TrainingError("loss is nan"), 3, "error: loss is nan"),
    (WorkerError("a worker process died"), 4, "error: a worker process died"),
    (KeyboardInterrupt(), 130, "error: interrupted"),
    (KeyboardInterrupt("out/ is incomplete (no manifest.json)"), 130,
     "error: interrupted: out/ is incomplete (no manifest.json)"),
    (DataError(""), 1, "error: DataError"),
])
def test_run_command_prints_one_line_and_returns_the_table_status(capsys, err, status, line):
    assert cli.run_command(raiser(err), ["--x"]) == status
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


@pytest.mark.parametrize("returned, status", [(None, 0), (0, 0), (4, 4)])
def test_run_command_passes_argv_and_returns_main_status(capsys, returned, status):
    seen = []

    def run(argv):
        seen.append(argv)
        return returned

    assert cli.run_command(run, ["a", "b"]) == status
    assert seen == [["a", "b"]] and capsys.readouterr().err == ""


def test_run_command_lets_unknown_exceptions_propagate(capsys):
    with pytest.raises(ZeroDivisionError):
        cli.run_command(raiser(ZeroDivisionError("a bug")))
    assert capsys.readouterr().err == ""  # the traceback is Python's to print, not an error: line


def test_argument_parser_errors_are_usage_errors(capsys):
    def run(argv):
        parser = cli.ArgumentParser(prog="cmd.py")
        parser.add_argument("--n", type=int, required=True)
        return parser.parse_args(argv).n - 7

    assert cli.run_command(run, ["--n", "7"]) == 0
    assert cli.run_command(run, ["--n", "seven"]) == 2
    assert cli.run_command(run, []) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") and "cmd.py --help" in line for line in lines)
    assert "--n" in lines[1] and "usage:" not in "".join(lines)
    with pytest.raises(SystemExit) as info:  # --help is no error
        run(["--help"])
    assert info.value.code == 0 and "usage: cmd.py" in capsys.readouterr().out


def test_exit_table_values():
    assert (cli.EXIT_OK, cli.EXIT_DATA, cli.EXIT_USAGE, cli.EXIT_TRAINING, cli.EXIT_WORKER,
            cli.EXIT_INTERRUPTED) == (0, 1, 2, 3, 4, 130)




def test_a_signal_inside_signals_deferred_takes_effect_when_the_block_ends():
    """SIGTERM during a checkpoint write waits for it (torch.save cut half way ends in a traceback)."""
    import os
    import signal

    from distil_ja.cli import Terminated, _terminate, signals_deferred

    previous = signal.signal(signal.SIGTERM, _terminate)
    done = []
    try:
        with pytest.raises(Terminated):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("the block ran to its end")
        assert done == ["the block ran to its end"]
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
        with signals_deferred():  # nothing caught: nothing raised, the handlers are back
            pass
        assert signal.getsignal(signal.SIGTERM) is _terminate
    finally:
        signal.signal(signal.SIGTERM, previous)
