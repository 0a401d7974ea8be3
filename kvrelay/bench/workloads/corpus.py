"""A code corpus on disk: the source files the synthetic coding workloads quote.

Owns: `CodeCorpus` (source files grouped into "repositories" = directories, listed in a stable
order, read lazily), the default corpus (this Python's standard library), and small text
helpers the generators share (function names of a file, a file cut to a character budget),
and `CorpusWorkload`, the base of the generators that quote it (options, seed, corpus and
their description).
Must not import anything from kvrelay outside `kvrelay.bench.workloads` and `errors`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sysconfig
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from kvrelay.errors import InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_SUFFIXES = (".py", ".c", ".h", ".cc", ".cpp", ".rs", ".go", ".js", ".ts", ".java")
_SKIP_DIRS = frozenset({"site-packages", "__pycache__", ".git", "node_modules", ".venv", "venv"})
_DEF_RE = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+([A-Za-z_]\w*)[ \t]*\(", re.MULTILINE)
_FUNC_FALLBACK_RE = re.compile(r"\b([A-Za-z_]\w{3,})[ \t]*\(")


@dataclass(frozen=True)
class SourceFile:
    """One file of the corpus: its path relative to the corpus root and its text."""

    rel_path: str
    text: str


class CodeCorpus:
    """Source files under `root`, grouped by directory ("repositories"), in sorted order.

    Files smaller than `min_bytes` or larger than `max_bytes` are skipped so that every file
    can be quoted whole; undecodable files are skipped too.
    """

    def __init__(
        self,
        root: Path,
        suffixes: tuple[str, ...] = DEFAULT_SUFFIXES,
        min_bytes: int = 400,
        max_bytes: int = 24_000,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidRequestError(f"corpus directory {self.root} does not exist")
        self.suffixes = suffixes
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes

    @classmethod
    def default(cls) -> CodeCorpus:
        """The Python standard library of the running interpreter."""
        return cls(Path(sysconfig.get_paths()["stdlib"]))

    @classmethod
    def from_option(cls, root: str | None) -> CodeCorpus:
        """The directory a workload's `corpus` option names, or the default corpus."""
        return cls(Path(root)) if root else cls.default()

    @cached_property
    def repos(self) -> dict[str, tuple[str, ...]]:
        """Directory (relative, '.' for the root) -> its eligible files, both sorted."""
        groups: dict[str, list[str]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root)
            for filename in filenames:
                if Path(filename).suffix not in self.suffixes:
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, filename)).st_size
                except OSError:
                    continue
                if self.min_bytes <= size <= self.max_bytes:
                    groups.setdefault(str(rel_dir), []).append((rel_dir / filename).as_posix())
        if not groups:
            raise InvalidRequestError(
                f"corpus {self.root} has no source files ({', '.join(self.suffixes)}) between "
                f"{self.min_bytes} and {self.max_bytes} bytes"
            )
        logger.info(
            "corpus %s: %d files in %d directories",
            self.root,
            sum(map(len, groups.values())),
            len(groups),
        )
        return {name: tuple(sorted(files)) for name, files in sorted(groups.items())}

    @cached_property
    def repo_names(self) -> tuple[str, ...]:
        return tuple(self.repos)

    def read(self, rel_path: str) -> SourceFile:
        """The file's text (undecodable bytes replaced, so every file reads)."""
        text = (self.root / rel_path).read_text(encoding="utf-8", errors="replace")
        return SourceFile(rel_path, text.replace("\r\n", "\n"))

    def pick_repo(self, rng: random.Random, min_files: int = 1) -> str:
        """A repository with at least `min_files` files when there is one."""
        rich = [name for name in self.repo_names if len(self.repos[name]) >= min_files]
        return rng.choice(rich or list(self.repo_names))

    def context_files(self, repo: str, rng: random.Random, budget_chars: int) -> list[SourceFile]:
        """Files of `repo` in a seeded order, whole, until the character budget is used."""
        names = list(self.repos[repo])
        rng.shuffle(names)
        chosen: list[SourceFile] = []
        used = 0
        for name in names:
            source = self.read(name)
            if chosen and used + len(source.text) > budget_chars:
                continue
            chosen.append(source)
            used += len(source.text)
            if used >= budget_chars:
                break
        return chosen


def function_names(text: str) -> list[str]:
    """Names of the functions a file defines (`def name(`), else called-looking identifiers."""
    names = _DEF_RE.findall(text) or _FUNC_FALLBACK_RE.findall(text)
    return list(dict.fromkeys(names)) or ["main"]


def cut(text: str, max_chars: int) -> str:
    """`text` cut at a line boundary to at most `max_chars` characters."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    newline = head.rfind("\n")
    return head[: newline + 1] if newline > 0 else head


def render_file(source: SourceFile) -> str:
    """A file quoted in a prompt: a header line with its path, then a fenced block."""
    lang = Path(source.rel_path).suffix.lstrip(".") or "text"
    body = source.text if source.text.endswith("\n") else source.text + "\n"
    return f"### {source.rel_path}\n```{lang}\n{body}```\n"


class CorpusOptions(Protocol):
    """What `CorpusWorkload` needs of a generator's options: a dataclass with `corpus`."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def corpus(self) -> str | None: ...


CorpusOptionsT = TypeVar("CorpusOptionsT", bound=CorpusOptions)


class CorpusWorkload(Generic[CorpusOptionsT]):
    """A generator over a code corpus: its options, its seed and the corpus (the one given,
    else the options' directory, else this Python's standard library)."""

    name: str

    def __init__(self, options: CorpusOptionsT, seed: int, corpus: CodeCorpus | None) -> None:
        self.options = options
        self.seed = seed
        self.corpus = corpus if corpus is not None else CodeCorpus.from_option(options.corpus)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "corpus": str(self.corpus.root),
            **asdict(self.options),
        }
