"""`sentcode chat` through a pseudo-terminal: streaming replies, commands, Ctrl+C and Ctrl+D."""

from __future__ import annotations

import re
import sys

import pytest

import sentcode
from sentcode.serve.chat import Chat, fit_context

from conftest import subprocess_env

pexpect = pytest.importorskip("pexpect", reason="the chat tests drive a terminal with pexpect (dev extra)")

PROMPT = "\r\n> "
TIMEOUT = 60


def spawn(run_dir, *args, preexec_fn=None):
    child = pexpect.spawn(sys.executable, ["-m", "sentcode.cli", "chat", str(run_dir), *args], env=subprocess_env(),
                          encoding="utf-8", timeout=TIMEOUT, dimensions=(24, 500), preexec_fn=preexec_fn)
    child.expect("Ctrl\\+D quits\\.")
    child.expect("> ")
    return child


def said(child) -> str:
    """What the program printed before the next prompt, with the terminal's line endings undone."""
    child.expect(PROMPT)
    return child.before.replace("\r\n", "\n")


def interrupt(child, expected: str) -> None:
    """Ctrl+C, then wait for ``expected``. One repeat: under heavy load a Ctrl+C typed while readline is
    redrawing the line was once not delivered as an interrupt (as a user would, we press it again)."""
    child.sendintr()
    if child.expect_exact([expected, pexpect.TIMEOUT], timeout=15) == 1:
        child.sendintr()
        child.expect_exact(expected)


def ask(child, line: str) -> str:
    """Send a line; what the program printed in answer, before the next prompt."""
    child.sendline(line)
    child.expect_exact(line + "\r\n")  # the terminal's echo of the line
    return said(child)


def test_flat_chat_session(trained_run):
    run = trained_run[0]
    g = sentcode.load(run)
    first = "The state of the Union"
    # A seeded session samples turn n with seed + n; a low temperature keeps the text printable.
    reply1 = g.generate(first, max_bytes=40, temperature=0.5, seed=7)
    assert reply1.strip()
    second = "We must"
    # The second line is a new paragraph after the first reply, and the model sees the newest part of the
    # conversation that fits its context.
    reply2 = g.generate(fit_context(g.tokenizer, first + reply1 + "\n" + second, g.context - 1), max_bytes=40,
                        temperature=0.5, seed=8)

    child = spawn(run, "--temperature", "0.5", "--max", "40", "--seed", "7")
    assert ask(child, first) == reply1
    assert ask(child, second) == reply2
    # /reset starts over as a new session would: the same line gets the reply a first turn gets.
    assert ask(child, "/reset") == "conversation cleared"
    assert ask(child, second) == g.generate(second, max_bytes=40, temperature=0.5, seed=7)

    # Bad input: one line each, and the session goes on.
    for line, message in [("/temperature abc", "temperature must be a number >= 0"),
                          ("/temperature -1", "temperature must be a number >= 0"),
                          ("/max -1", "max must be an integer from 1 to"),
                          ("/max many", "max must be an integer from 1 to"),
                          ("/frobnicate", "unknown command /frobnicate; /help lists the commands")]:
        out = ask(child, line)
        assert out.startswith(message) and "\n" not in out, out
    assert "/temperature T" in ask(child, "/help")
    assert "temperature 1.5" in ask(child, "/temperature 1.5")
    assert "max 5 bytes per reply" in ask(child, "/max 5")
    assert "temperature 0 (greedy)" in ask(child, "/temperature 0")

    # Ctrl+C at the prompt drops the half-typed line: what follows is a command, not text.
    child.send("half a line")
    child.expect_exact("half a line")
    interrupt(child, "> ")
    assert "max 100000 bytes per reply" in ask(child, "/max 100000")

    # Ctrl+C during a long reply stops it once it has started streaming, and the prompt comes back.
    child.sendline(first)
    child.expect_exact(first + "\r\n")
    child.expect(r"[^\r\n]{20}")  # the reply is arriving piece by piece
    interrupt(child, "(stopped)")
    child.expect("> ")
    assert "conversation cleared" in ask(child, "/reset")

    # Ctrl+D quits with status 0.
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_long_greedy_reply_does_not_end_early(trained_run):
    """The Ctrl+C test above relies on a greedy reply that outlasts the interrupt."""
    g = sentcode.load(trained_run[0])
    assert len(g.generate("The state of the Union", max_bytes=300, temperature=0).encode()) == 300


def test_sentence_chat(sentence_run):
    child = spawn(sentence_run, "--max", "1", "--seed", "0")
    child.sendline("The state of the Union is strong.")
    child.expect_exact("strong.\r\n")
    out = said(child).strip()
    assert out and not out.startswith("error")
    assert "max must be an integer from 1 to 64 (sentences per reply)" in ask(child, "/max 65")
    assert "max 2 sentences per reply" in ask(child, "/max 2")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_joins_turns_and_fits_the_context(trained_run):
    g = sentcode.load(trained_run[0])
    lines = []

    class Out:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass

    chat = Chat(g, temperature=0, max_len=10, out=Out())
    r1 = chat.reply("Peace")
    r2 = chat.reply("War")
    assert chat.conversation == "Peace" + r1 + "\nWar" + r2
    assert r2 == g.generate(fit_context(g.tokenizer, "Peace" + r1 + "\nWar", g.context - 1), max_bytes=10,
                            temperature=0)
    # A conversation longer than the context keeps its newest tokens, cut at a character boundary.
    long = "é" * 100 + "The end"
    kept = fit_context(g.tokenizer, long, g.context - 1)
    assert len(kept) <= g.context - 1 and long.encode().endswith(kept) and kept.decode("utf-8")
    assert re.fullmatch("(é)*The end", kept.decode())


def test_bad_options_end_in_one_line(trained_run, capsys):
    from sentcode.cli import main

    assert main(["chat", str(trained_run[0]), "--temperature", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: temperature must be >= 0, got -1.0"
    assert main(["chat", str(trained_run[0]), "--max", "0"]) == 2
    assert "max must be an integer from 1 to 100000" in capsys.readouterr().err
    assert main(["chat", str(trained_run[0]) + "-missing"]) == 2
    assert capsys.readouterr().err.startswith("error: no run directory at")


def test_ctrl_c_works_when_started_with_sigint_ignored(trained_run):
    """A chat started from a context that ignores SIGINT (as background jobs of a non-interactive shell are)
    still treats Ctrl+C as Ctrl+C."""
    import signal

    child = spawn(trained_run[0], "--max", "20", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    child.send("half a line")
    child.expect_exact("half a line")
    child.sendintr()
    child.expect_exact("> ", timeout=15)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
