"""`code-sessions`: coding-assistant chats over real repository context.

Owns: the `code-sessions` generator. Every session is one developer in one repository: the
shared system prompt, then a first user message quoting repository files (the same files, in
the same order, for every session on that repository) followed by a task; then follow-up turns
(the error they got, another file, the same change elsewhere) whose history grows each turn,
with think time between turns. Assistant replies are synthetic edits of the quoted code.
Prefix structure (tested): all sessions share the system message; sessions on one repository
share the first user message up to the task; turn k's messages extend turn k-1's.
Must not import the load client, reports or anything outside `kvrelay.bench.workloads`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from kvrelay.bench.workloads.base import (
    CHARS_PER_TOKEN,
    Message,
    RequestSpec,
    Session,
    Turn,
    exp_pause,
    session_rng,
)
from kvrelay.bench.workloads.corpus import (
    CodeCorpus,
    CorpusWorkload,
    SourceFile,
    cut,
    function_names,
    render_file,
)

NAME = "code-sessions"

SYSTEM_PROMPT = """\
You are a senior software engineer pairing with a developer inside their repository.
Rules for every answer:
- Read the files the developer quotes before answering; do not invent functions that are not there.
- Keep the existing style: naming, indentation, docstrings, error handling and type hints.
- When you change code, show the whole changed function in one fenced block, then explain the
  change in at most three sentences.
- Prefer small, reviewable edits over rewrites. Keep public signatures unless asked.
- If a request is ambiguous, state the assumption you made in one line and proceed.
- When a test fails, explain the root cause before proposing a fix.
- Never remove existing tests. Add a test for each bug you fix.
"""

_TASKS = (
    "Add precise type hints to `{fn}` in `{path}` without changing its behaviour.",
    "Write a pytest unit test for `{fn}` in `{path}` that covers its edge cases.",
    "`{fn}` in `{path}` is slow on large inputs. Make it faster and explain why.",
    "Add a docstring to `{fn}` in `{path}` that explains its arguments and return value.",
    "`{fn}` in `{path}` should raise a clear error on invalid input. Add that check.",
    "Refactor `{fn}` in `{path}` into smaller helpers; keep the public signature.",
)
_FOLLOW_UPS = (
    "That fails when I run it:\n```\nTraceback (most recent call last):\n"
    '  File "{path}", line {line}, in {fn}\nTypeError: unsupported operand type(s)\n```\n'
    "Please fix it.",
    "Good. Now apply the same change to `{fn}` as well.",
    "`{fn}` calls into this file too, here it is:\n\n{file}\nUpdate the change so both agree.",
    "Please also log a warning in `{fn}` when it takes the slow path.",
    "Can you make `{fn}` keep backwards compatibility with the old keyword arguments?",
)


@dataclass(frozen=True)
class CodeSessionsOptions:
    """Knobs of the generator (`-W key=value` on the command line)."""

    corpus: str | None = None  # source directory; None: this Python's standard library
    num_repos: int = 8  # repositories the sessions draw from (their contexts are shared)
    context_tokens: int = 3000  # repository files quoted in the first user message
    turns_min: int = 2
    turns_max: int = 6
    think_time_s: float = 20.0  # mean pause between turns (exponential)
    reply_tokens: int = 150  # size of each synthetic assistant reply kept in the history
    max_tokens: int = 128  # output tokens requested per turn


class CodeSessionsWorkload(CorpusWorkload[CodeSessionsOptions]):
    """Infinite stream of coding sessions, fixed by `seed` and the corpus."""

    name = NAME

    def __init__(
        self,
        options: CodeSessionsOptions | None = None,
        seed: int = 0,
        corpus: CodeCorpus | None = None,
    ) -> None:
        super().__init__(options or CodeSessionsOptions(), seed, corpus)
        self._contexts: dict[str, list[SourceFile]] = {}

    def repositories(self) -> list[str]:
        """The repositories sessions are drawn from, fixed by the seed."""
        rng = random.Random(f"{NAME}:{self.seed}:repos")
        names = [n for n in self.corpus.repo_names if len(self.corpus.repos[n]) >= 2]
        names = names or list(self.corpus.repo_names)
        return rng.sample(names, min(self.options.num_repos, len(names)))

    def context(self, repo: str) -> list[SourceFile]:
        """The files quoted for `repo`: identical for every session on it."""
        if repo not in self._contexts:
            rng = random.Random(f"{NAME}:{self.seed}:context:{repo}")
            budget = self.options.context_tokens * CHARS_PER_TOKEN
            self._contexts[repo] = self.corpus.context_files(repo, rng, budget)
        return self._contexts[repo]

    def sessions(self) -> Iterator[Session]:
        repos = self.repositories()
        index = 0
        while True:
            rng = session_rng(self.seed, NAME, index)
            yield self._session(index, rng.choice(repos), rng)
            index += 1

    def _session(self, index: int, repo: str, rng: random.Random) -> Session:
        opts = self.options
        files = self.context(repo)
        session_id = f"{NAME}-{self.seed}-{index}"
        target = rng.choice(files)
        fn = rng.choice(function_names(target.text))
        quoted = "".join(render_file(f) for f in files)
        first = (
            f"I'm working in the repository `{repo}`. Here are the relevant files.\n\n{quoted}\n"
            + rng.choice(_TASKS).format(fn=fn, path=target.rel_path)
        )
        history: list[Message] = [Message("system", SYSTEM_PROMPT), Message("user", first)]
        turns: list[Turn] = []
        num_turns = rng.randint(opts.turns_min, max(opts.turns_min, opts.turns_max))
        for k in range(num_turns):
            request = RequestSpec(
                request_id=f"{session_id}-t{k}",
                kind="chat",
                max_tokens=opts.max_tokens,
                messages=tuple(history),
            )
            delay = 0.0 if k == 0 else exp_pause(rng, opts.think_time_s)
            turns.append(Turn(request, delay_s=delay))
            history.append(Message("assistant", self._reply(target, fn, k)))
            target, fn = self._next_focus(rng, files, target, fn)
            history.append(Message("user", self._follow_up(rng, repo, target, fn)))
        return Session(session_id, tuple(turns), tags={"repo": repo})

    def _reply(self, target: SourceFile, fn: str, turn: int) -> str:
        """A synthetic assistant edit: the function's source with a marker line added."""
        budget = self.options.reply_tokens * CHARS_PER_TOKEN
        body = function_source(target.text, fn, max(budget - 200, 80))
        lines = body.splitlines()
        indent = " " * (len(lines[1]) - len(lines[1].lstrip())) if len(lines) > 1 else "    "
        lines.insert(1, f"{indent}# edit {turn}: keep {fn} behaviour, tighten input checks")
        code = "\n".join(lines)
        return (
            f"Here is the updated `{fn}` from `{target.rel_path}`:\n```python\n{code}\n```\n"
            f"I kept the signature of `{fn}` and only changed its body; callers are unaffected."
        )

    def _next_focus(
        self, rng: random.Random, files: list[SourceFile], target: SourceFile, fn: str
    ) -> tuple[SourceFile, str]:
        if rng.random() < 0.5:
            return target, fn
        target = rng.choice(files)
        return target, rng.choice(function_names(target.text))

    def _follow_up(self, rng: random.Random, repo: str, target: SourceFile, fn: str) -> str:
        template = rng.choice(_FOLLOW_UPS)
        if "{file}" not in template:
            return template.format(fn=fn, path=target.rel_path, line=rng.randint(10, 400))
        others = self.corpus.repos[repo]
        extra = self.corpus.read(rng.choice(others))
        budget = self.options.context_tokens * CHARS_PER_TOKEN // 4
        quoted = render_file(SourceFile(extra.rel_path, cut(extra.text, budget)))
        return template.format(fn=fn, file=quoted)


def function_source(text: str, name: str, max_chars: int) -> str:
    """The source of `def name(...)` in `text` (up to the next line at its indentation or
    less), cut to `max_chars`; the first lines of the file when there is no such function."""
    lines = text.splitlines()
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if line.lstrip().startswith(f"def {name}(")
            or line.lstrip().startswith(f"async def {name}(")
        ),
        None,
    )
    if start is None:
        return cut(text, max_chars).rstrip("\n") or "pass"
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines):
        line = lines[end]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        end += 1
    return cut("\n".join(lines[start:end]), max_chars).rstrip("\n")
