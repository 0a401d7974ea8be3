"""`agent`: a coding agent's tool loop over a real repository.

Owns: the `agent` generator. A session is one agent run: the shared system prompt (rules and
tool descriptions), a human task, then model calls that each append the agent's tool call and
the tool's output (file reads, grep hits, test logs, edit confirmations), with short tool
pauses between calls; after a task's last step the human answers after a long pause with the
next task. Tool results are sent as user messages (`<tool_result ...>`) so every chat template
accepts them. Prefix structure (tested): every call's messages extend the previous call's.
Must not import the load client, reports or anything outside `kvrelay.bench.workloads`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
)

NAME = "agent"

SYSTEM_PROMPT = """\
You are an autonomous coding agent working in a checked-out repository. You act only through
tools; call exactly one tool per message as <tool_call>{"name": ..., "arguments": {...}}</tool_call>
and wait for its <tool_result>. Tools:
- read_file(path): the file's contents.
- grep(pattern): matching lines with their paths and line numbers.
- run_tests(target): run pytest on a file or test id and return its log.
- edit_file(path, old, new): replace the text `old` with `new` in `path`.
Work method: reproduce the problem with run_tests, read the code involved, make the smallest
edit that fixes it, run the tests again, then reply with a summary starting with "Done:".
Never edit tests to make them pass. Never touch files outside the repository.
"""

_TASKS = (
    "The test `test_{fn}` fails after the last merge. Find the cause and fix it.",
    "Add input validation to `{fn}` and make sure the existing tests still pass.",
    "`{fn}` is reported to be slow; profile it with the tests and speed it up.",
    "Rename the helper `{fn}` to `_{fn}_impl` and keep a deprecated alias.",
)
# Mean pause of each tool relative to `tool_pause_s`: reads are fast, test runs slow.
_TOOL_PAUSE = {"read_file": 0.3, "grep": 0.5, "run_tests": 3.0, "edit_file": 0.2}


@dataclass(frozen=True)
class AgentOptions:
    """Knobs of the generator (`-W key=value` on the command line)."""

    corpus: str | None = None  # source directory; None: this Python's standard library
    num_repos: int = 8
    tasks_min: int = 1  # human instructions per session
    tasks_max: int = 3
    steps_min: int = 3  # model calls per task
    steps_max: int = 8
    tool_pause_s: float = 1.0  # mean tool pause, scaled per tool (exponential)
    human_pause_s: float = 60.0  # mean pause before the human's next task (exponential)
    tool_output_tokens: int = 800  # cap on one tool result
    max_tokens: int = 96


class AgentWorkload(CorpusWorkload[AgentOptions]):
    """Infinite stream of agent runs, fixed by `seed` and the corpus."""

    name = NAME

    def __init__(
        self, options: AgentOptions | None = None, seed: int = 0, corpus: CodeCorpus | None = None
    ) -> None:
        super().__init__(options or AgentOptions(), seed, corpus)

    def repositories(self) -> list[str]:
        rng = random.Random(f"{NAME}:{self.seed}:repos")
        names = list(self.corpus.repo_names)
        return rng.sample(names, min(self.options.num_repos, len(names)))

    def sessions(self) -> Iterator[Session]:
        repos = self.repositories()
        index = 0
        while True:
            rng = session_rng(self.seed, NAME, index)
            yield self._session(index, rng.choice(repos), rng)
            index += 1

    def _session(self, index: int, repo: str, rng: random.Random) -> Session:
        opts = self.options
        session_id = f"{NAME}-{self.seed}-{index}"
        history = [Message("system", SYSTEM_PROMPT)]
        turns: list[Turn] = []
        pause = 0.0
        num_tasks = rng.randint(opts.tasks_min, max(opts.tasks_min, opts.tasks_max))
        for task in range(num_tasks):
            target = self.corpus.read(rng.choice(self.corpus.repos[repo]))
            fn = rng.choice(function_names(target.text))
            history.append(Message("user", rng.choice(_TASKS).format(fn=fn)))
            num_steps = rng.randint(opts.steps_min, max(opts.steps_min, opts.steps_max))
            for step in range(num_steps):
                request = RequestSpec(
                    request_id=f"{session_id}-k{task}s{step}",
                    kind="chat",
                    max_tokens=opts.max_tokens,
                    messages=tuple(history),
                )
                turns.append(Turn(request, delay_s=pause))
                if step == num_steps - 1:
                    history.append(Message("assistant", f"Done: fixed `{fn}`; tests pass."))
                    pause = exp_pause(rng, opts.human_pause_s)
                    break
                tool, args, output = self._tool_call(rng, repo, target, fn, step)
                call = json.dumps({"name": tool, "arguments": args}, sort_keys=True)
                history.append(Message("assistant", f"<tool_call>{call}</tool_call>"))
                history.append(
                    Message("user", f'<tool_result name="{tool}">\n{output}\n</tool_result>')
                )
                pause = exp_pause(rng, opts.tool_pause_s * _TOOL_PAUSE[tool])
        return Session(session_id, tuple(turns), tags={"repo": repo})

    def _tool_call(
        self, rng: random.Random, repo: str, target: SourceFile, fn: str, step: int
    ) -> tuple[str, dict[str, str], str]:
        cap = self.options.tool_output_tokens * CHARS_PER_TOKEN
        tool = "run_tests" if step == 0 else rng.choice(tuple(_TOOL_PAUSE))
        if tool == "read_file":
            return tool, {"path": target.rel_path}, cut(target.text, cap)
        if tool == "grep":
            return tool, {"pattern": fn}, cut(self._grep(repo, fn), cap)
        if tool == "run_tests":
            test_path = f"tests/test_{Path(target.rel_path).stem}.py"
            return tool, {"target": test_path}, cut(pytest_log(target, fn, rng), cap)
        old = f"def {fn}("
        args = {"path": target.rel_path, "old": old, "new": old}
        return tool, args, f"Applied edit to {target.rel_path}: {rng.randint(1, 12)} lines changed."

    def _grep(self, repo: str, pattern: str) -> str:
        hits: list[str] = []
        for rel_path in self.corpus.repos[repo]:
            for number, line in enumerate(self.corpus.read(rel_path).text.splitlines(), 1):
                if pattern in line:
                    hits.append(f"{rel_path}:{number}:{line.strip()}")
        return "\n".join(hits) or "(no matches)"


def pytest_log(target: SourceFile, failing: str, rng: random.Random) -> str:
    """A pytest-like log over the file's functions with `failing`'s test failing."""
    names = function_names(target.text)[:20]
    stem = Path(target.rel_path).stem
    lines = [f"============ test session starts ============\ncollected {len(names)} items\n"]
    for name in names:
        status = "FAILED" if name == failing else "PASSED"
        lines.append(f"tests/test_{stem}.py::test_{name} {status}")
    lines.append(
        f"\n================= FAILURES =================\n___ test_{failing} ___\n"
        f"    def test_{failing}():\n>       assert {failing}(*CASES[{rng.randint(0, 9)}]) == "
        f"EXPECTED\nE       AssertionError: got None\n\n{target.rel_path}:{rng.randint(5, 300)}: "
        f"AssertionError\n========= 1 failed, {len(names) - 1} passed in "
        f"{rng.uniform(0.2, 9.0):.2f}s ========="
    )
    return "\n".join(lines)
