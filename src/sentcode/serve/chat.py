"""``sentcode chat RUN_DIR``: a streaming REPL over any trained run.

The models are continuation models, not instruction-tuned assistants, so a chat is writing together: each
line you enter is appended to the conversation and the model continues it. How turns are joined:

- flat LM: the conversation is one text; each new line starts a new paragraph (it is joined with ``\\n``)
  and the reply continues it directly, with no separator. The model sees the most recent tokens of the
  conversation that fit its context (a document start, then as much recent text as fits).
- sentence run: lines and replies are joined with single spaces (the sentence pipeline normalises every
  break to one), and the reply is its generated sentences joined by spaces. The planner reads the most
  recent sentences that fit it (``planner.max_steps - 1``).

Commands: ``/reset``, ``/temperature T``, ``/max N`` (bytes per reply for a flat LM, sentences for a sentence
run), ``/help``, ``/quit``; a line that starts with ``//`` is text that starts with ``/``. Ctrl+C during a reply
stops it (what was shown stays in the conversation) and returns to the prompt; Ctrl+C at the prompt clears
the line; Ctrl+D (or ``/quit``) exits with status 0.
"""

from __future__ import annotations

import math
import signal
import sys
from typing import TextIO

from sentcode.errors import SentcodeError
from sentcode.registry import family_of

PROMPT = "> "
HISTORY_CHARS = 65536  # a sentence run reads a few sentences: no need to re-split a whole long conversation
MAX_BYTES = 100_000
HELP = """commands:
  /reset          forget the conversation
  /temperature T  sampling temperature, 0 is greedy
  /max N          longest reply: {unit}
  /help           this list
  /quit           leave (Ctrl+D does the same)
a line starting with // is sent as text starting with /; Ctrl+C stops a reply or clears the line"""


def fit_context(tokenizer, text: str, budget: int) -> bytes:
    """The newest part of ``text`` that is at most ``budget`` tokens, cut at a character boundary."""
    data = text.encode("utf-8", "surrogateescape")
    full = tokenizer.encode(data)
    if len(full) <= budget:
        return data
    for keep in range(budget, 0, -1):  # re-encoding a cut text may take more tokens than the slice held
        # A cut inside a UTF-8 character would leave stray continuation bytes at the start.
        data = tokenizer.decode(full[len(full) - keep :]).lstrip(bytes(range(0x80, 0xC0)))
        if len(tokenizer.encode(data)) <= budget:
            return data
    return b""


class Chat:
    """The conversation and the settings of one chat session; ``run`` is the loop."""

    def __init__(self, gen, temperature: float = 0.8, max_len: int | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, out: TextIO | None = None):
        self.gen = gen
        self.sentence = family_of(gen).steps_by_sentence
        self.temperature = temperature
        self.max_len = max_len if max_len is not None else (3 if self.sentence else 200)
        self.top_k, self.top_p, self.seed = top_k, top_p, seed
        self.out = out or sys.stdout
        self.conversation = ""
        self.turns = 0
        self._check_max(self.max_len)

    @property
    def unit(self) -> str:
        return family_of(self.gen).unit if self.sentence else "bytes"

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def _check_max(self, n: int) -> None:
        top = 64 if self.sentence else MAX_BYTES
        if not 1 <= n <= top:
            raise SentcodeError(f"max must be an integer from 1 to {top} ({self.unit} per reply), got {n}")

    # ---- commands --------------------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Carry out a /command; False when it asks to quit. Bad input prints one line."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name == "quit" or name == "exit":
            return False
        if name == "help":
            self.say(HELP.format(unit=self.unit))
        elif name == "reset":
            self.conversation, self.turns = "", 0
            self.say("conversation cleared")
        elif name == "temperature":
            try:
                t = float(arg)
            except ValueError:
                t = math.nan
            if not math.isfinite(t) or t < 0:
                self.say(f"temperature must be a number >= 0 (0 is greedy), got {arg!r}; it stays {self.temperature:g}")
            else:
                self.temperature = t
                self.say(f"temperature {t:g}" + (" (greedy)" if t == 0 else ""))
        elif name == "max":
            try:
                n = int(arg)
                self._check_max(n)
            except (ValueError, SentcodeError):
                top = 64 if self.sentence else MAX_BYTES
                self.say(f"max must be an integer from 1 to {top} ({self.unit} per reply), got {arg!r}; "
                         f"it stays {self.max_len}")
            else:
                self.max_len = n
                self.say(f"max {n} {self.unit} per reply")
        else:
            self.say(f"unknown command /{name}; /help lists the commands")
        return True

    # ---- replies ---------------------------------------------------------------------------------------------

    def _pieces(self, prompt: str):
        seed = None if self.seed is None else self.seed + self.turns  # a seeded session is reproducible
        kw = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed)
        if self.sentence:
            return self.gen.stream(prompt[-HISTORY_CHARS:], max_sentences=self.max_len, **kw)
        # _prompt_ids adds the document start token, hence one token less than the context
        return self.gen.stream(fit_context(self.gen.tokenizer, prompt, self.gen.context - 1),
                               max_bytes=self.max_len, **kw)

    def reply(self, text: str) -> str:
        """Append ``text`` to the conversation and stream the model's reply; Ctrl+C stops it early."""
        sep = " " if self.sentence else "\n"
        prompt = self.conversation + sep + text if self.conversation else text
        pieces = self._pieces(prompt)  # a bad request fails here, before anything is shown
        self.conversation, self.turns = prompt, self.turns + 1
        shown, stopped = [], False
        try:
            for piece in pieces:
                piece = " " + piece if self.sentence else piece
                self.out.write(piece)
                self.out.flush()
                shown.append(piece)
        except KeyboardInterrupt:
            stopped = True
            self.out.write("\n(stopped)")
        finally:
            self.conversation += "".join(shown)  # what the user saw is part of the conversation
        if not shown and not stopped:
            self.out.write("(no reply: the model ended the text)")
        self.say("")
        return "".join(shown)

    def run(self, read=input) -> int:
        """The loop: read a line, run a command or reply, until Ctrl+D or /quit."""
        while True:
            try:
                line = read(PROMPT)
            except KeyboardInterrupt:  # Ctrl+C at the prompt: drop the line, ask again
                self.say("")
                continue
            except EOFError:
                self.say("")
                return 0
            try:
                if line.startswith("/") and not line.startswith("//"):
                    if not self.command(line):
                        return 0
                    continue
                text = line[1:] if line.startswith("//") else line
                if text.strip():
                    self.reply(text)
            except SentcodeError as e:
                self.say(f"error: {e}")
            except KeyboardInterrupt:  # between a reply and the next prompt
                self.say("")


def run_chat(run_dir, temperature: float = 0.8, max_len: int | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, backend: str = "torch") -> int:
    """Load a run and chat with it on the terminal; returns the exit status."""
    import sentcode
    from sentcode.nn.sampling import check_sampling

    check_sampling(temperature, top_k, top_p)
    # Ctrl+C must stop a reply even when the chat was started from a context that ignores SIGINT (a process
    # started in the background by a non-interactive shell inherits SIG_IGN, and Python then installs no
    # KeyboardInterrupt handler of its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # noqa: F401  line editing and input history for input(), where the platform has it
    except ImportError:
        pass
    gen = sentcode.load(run_dir, backend=backend)
    chat = Chat(gen, temperature=temperature, max_len=max_len, top_k=top_k, top_p=top_p, seed=seed)
    if chat.sentence:
        kind = f"{family_of(gen).label}, {gen.history} {chat.unit} of history"
    else:
        kind = f"{gen.tokenizer.kind} LM, context {gen.context} tokens"
    chat.say(f"sentcode chat: {run_dir} ({kind}); max {chat.max_len} {chat.unit} per reply, temperature "
             f"{temperature:g}. Type text and Enter; /help lists the commands; Ctrl+D quits.")
    return chat.run()
