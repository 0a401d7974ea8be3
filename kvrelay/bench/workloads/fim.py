"""`fim`: fill-in-the-middle code completions at cursor positions in real files.

Owns: the `fim` generator. A session is one developer editing one file: completions at cursor
positions that move down the file, a short typing pause apart. Each prompt is a repository-level
FIM prompt (StarCoder-style special tokens):

    <repo_name>REPO <file_sep>PATH CONTEXT-FILE ... <file_sep>PATH <fim_prefix>BEFORE
    <fim_suffix>AFTER <fim_middle>

so every request on a file shares the repository context and the file's text up to the earlier
cursor (tested: the text before `<fim_suffix>` of request i is a prefix of request i+1's), and
sessions on one repository share its context. Requests are plain completions (/v1/completions).
Must not import the load client, reports or anything outside `kvrelay.bench.workloads`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from kvrelay.bench.workloads.base import (
    CHARS_PER_TOKEN,
    RequestSpec,
    Session,
    Turn,
    exp_pause,
    session_rng,
)
from kvrelay.bench.workloads.corpus import CodeCorpus, CorpusWorkload, SourceFile, cut

NAME = "fim"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"
REPO_NAME, FILE_SEP = "<repo_name>", "<file_sep>"


@dataclass(frozen=True)
class FimOptions:
    """Knobs of the generator (`-W key=value` on the command line)."""

    corpus: str | None = None  # source directory; None: this Python's standard library
    num_repos: int = 8  # repositories the sessions draw from (their contexts are shared)
    context_tokens: int = 1500  # other files of the repository placed before the current one
    requests_min: int = 4  # completions per file (one session)
    requests_max: int = 12
    suffix_tokens: int = 256  # text after the cursor
    pause_s: float = 2.0  # mean typing pause between completions (exponential)
    max_tokens: int = 32


class FimWorkload(CorpusWorkload[FimOptions]):
    """Infinite stream of file-editing sessions, fixed by `seed` and the corpus."""

    name = NAME

    def __init__(
        self, options: FimOptions | None = None, seed: int = 0, corpus: CodeCorpus | None = None
    ) -> None:
        super().__init__(options or FimOptions(), seed, corpus)
        self._contexts: dict[str, str] = {}

    def repositories(self) -> list[str]:
        rng = random.Random(f"{NAME}:{self.seed}:repos")
        names = list(self.corpus.repo_names)
        return rng.sample(names, min(self.options.num_repos, len(names)))

    def context(self, repo: str) -> str:
        """`<repo_name>` header plus the repository's context files: shared by its sessions."""
        if repo not in self._contexts:
            rng = random.Random(f"{NAME}:{self.seed}:context:{repo}")
            files = self.corpus.context_files(
                repo, rng, self.options.context_tokens * CHARS_PER_TOKEN
            )
            parts = [f"{REPO_NAME}{repo}\n"]
            parts += [f"{FILE_SEP}{f.rel_path}\n{f.text}" for f in files]
            self._contexts[repo] = "".join(parts)
        return self._contexts[repo]

    def sessions(self) -> Iterator[Session]:
        repos = self.repositories()
        index = 0
        while True:
            rng = session_rng(self.seed, NAME, index)
            repo = rng.choice(repos)
            current = self.corpus.read(rng.choice(self.corpus.repos[repo]))
            yield self._session(index, repo, current, rng)
            index += 1

    def _session(self, index: int, repo: str, current: SourceFile, rng: random.Random) -> Session:
        opts = self.options
        session_id = f"{NAME}-{self.seed}-{index}"
        header = f"{self.context(repo)}{FILE_SEP}{current.rel_path}\n{FIM_PREFIX}"
        cursors = cursor_positions(current.text, rng, opts.requests_min, opts.requests_max)
        turns: list[Turn] = []
        for k, pos in enumerate(cursors):
            after = cut(current.text[pos:], opts.suffix_tokens * CHARS_PER_TOKEN)
            prompt = f"{header}{current.text[:pos]}{FIM_SUFFIX}{after}{FIM_MIDDLE}"
            request = RequestSpec(
                request_id=f"{session_id}-r{k}",
                kind="completion",
                max_tokens=opts.max_tokens,
                prompt=prompt,
            )
            turns.append(Turn(request, delay_s=0.0 if k == 0 else exp_pause(rng, opts.pause_s)))
        return Session(session_id, tuple(turns), tags={"repo": repo, "file": current.rel_path})


def cursor_positions(text: str, rng: random.Random, lo: int, hi: int) -> list[int]:
    """Sorted distinct line-start offsets (after the first line), `lo`..`hi` of them when the
    file has that many lines; at least one (the end of the text) for one-line files."""
    starts = [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)]
    if not starts:
        return [len(text)]
    count = min(len(starts), rng.randint(lo, max(lo, hi)))
    return sorted(rng.sample(starts, count))
