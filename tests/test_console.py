"""The command line's output off a terminal: plain lines, aligned tables, no rich."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

from bdc import console


def test_plain_table_is_aligned_text(capsys):
    console.table("scores", ["metric", "value"], [["pass_rate", "1.0000"], ["n", "7"]],
                  right=["value"])
    out = capsys.readouterr().out.splitlines()
    assert out == ["scores", "metric      value", "---------  ------",
                   "pass_rate  1.0000", "n               7"]


def test_plain_progress_prints_lines_not_a_bar(capsys):
    with console.progress() as bar:  # pytest's streams are not terminals
        assert isinstance(bar, console.PlainProgress)
        bar.every = 0.0
        task = bar.add_task("evaluating", total=3, info="")
        for i in range(3):
            bar.update(task, advance=1, info=f"passed {i + 1}")
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" [")[0] for ln in lines] == [
        "evaluating: 1/3 passed 1", "evaluating: 2/3 passed 2", "evaluating: 3/3 passed 3"]


def test_plain_progress_throttles_and_always_ends_with_the_final_state(capsys):
    with console.progress() as bar:
        task = bar.add_task("training", total=100)
        for step in range(1, 101):
            bar.update(task, completed=step)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[-1].startswith("training: 100/100")
    with console.progress() as bar:  # big counts stay whole numbers, not 1e+06
        bar.update(bar.add_task("evaluating", total=2_000_000), completed=1_000_000)
    assert capsys.readouterr().err.startswith("evaluating: 1000000/2000000")


def test_off_a_terminal_rich_is_not_imported_and_errors_are_one_plain_line(tmp_path):
    code = ("import sys; from bdc._cli import main; sys.argv = ['bdc', 'score', '--problems',"
            " 'p', '--samples', 's', '--out', 'o', '--split', 'nope']\n"
            "try:\n    main()\nexcept SystemExit as e:\n"
            "    print(e.code, 'rich' in sys.modules, file=sys.stdout)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.stdout.split() == ["2", "False"]
    assert proc.stderr.strip() == "error: --split must be hidden, public or all, not 'nope'"


def test_on_a_terminal_rich_draws_the_table_and_the_error():
    code = ("from bdc import console\n"
            "console.table('scores', ['metric', 'value'], [['n', '7']], right=['value'])\n"
            "console.error('bad [input]')\n")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=follower, stderr=follower,
                            env={**os.environ, "TERM": "xterm", "COLUMNS": "80"})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closes when the program ends
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=30) == 0
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())  # colours off
    assert "┏" in out and "metric" in out  # a rich table, not plain text
    assert "error:" in out and "bad [input]" in out  # markup in the message is escaped
