"""Workload generators: determinism from the seed and the prefix structure each one promises."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from kvrelay.bench.workloads import WORKLOAD_NAMES, Workload, make_workload
from kvrelay.bench.workloads.agent import SYSTEM_PROMPT as AGENT_SYSTEM
from kvrelay.bench.workloads.agent import AgentOptions, AgentWorkload
from kvrelay.bench.workloads.base import Message, Session, parse_options
from kvrelay.bench.workloads.code_sessions import SYSTEM_PROMPT as CODE_SYSTEM
from kvrelay.bench.workloads.code_sessions import CodeSessionsOptions, CodeSessionsWorkload
from kvrelay.bench.workloads.corpus import CodeCorpus
from kvrelay.bench.workloads.fim import (
    FILE_SEP,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    REPO_NAME,
    FimOptions,
    FimWorkload,
)
from kvrelay.bench.workloads.humaneval import (
    NUM_PROBLEMS,
    HumanEvalOptions,
    HumanEvalWorkload,
    few_shot_prefix,
)
from kvrelay.errors import InvalidRequestError

Factory = Callable[[int], Workload]


def common_prefix(texts: list[str]) -> str:
    first, last = min(texts), max(texts)
    size = next(
        (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first)
    )
    return first[:size]


def take(workload: Workload, n: int) -> list[Session]:
    return list(itertools.islice(workload.sessions(), n))


@pytest.fixture
def factories(corpus_dir: Path) -> dict[str, Factory]:
    corpus = str(corpus_dir)
    return {
        "code-sessions": lambda seed: CodeSessionsWorkload(
            CodeSessionsOptions(corpus=corpus, context_tokens=600, num_repos=2), seed
        ),
        "fim": lambda seed: FimWorkload(FimOptions(corpus=corpus, context_tokens=300), seed),
        "agent": lambda seed: AgentWorkload(AgentOptions(corpus=corpus), seed),
        "humaneval": lambda seed: HumanEvalWorkload(HumanEvalOptions(), seed),
    }


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_same_seed_same_sessions_other_seed_others(
    name: str, factories: dict[str, Factory]
) -> None:
    first, again, other = factories[name](7), factories[name](7), factories[name](8)
    assert take(first, 6) == take(again, 6)
    assert take(first, 6) == take(first, 6)  # sessions() restarts from the beginning
    assert take(first, 6) != take(other, 6)


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_session_content_does_not_depend_on_consumption(
    name: str, factories: dict[str, Factory]
) -> None:
    """Session i is the same whether or not earlier sessions were generated first."""
    workload = factories[name](3)
    sessions = take(workload, 5)
    assert take(factories[name](3), 5)[4] == sessions[4]
    ids = [t.request.request_id for s in sessions for t in s.turns]
    assert len(ids) == len(set(ids))


def test_request_ids_and_kinds(factories: dict[str, Factory]) -> None:
    kinds = {
        name: {t.request.kind for s in take(f(0), 3) for t in s.turns}
        for name, f in factories.items()
    }
    assert kinds == {
        "code-sessions": {"chat"},
        "fim": {"completion"},
        "agent": {"chat"},
        "humaneval": {"completion"},
    }


def assert_history_grows(session: Session) -> None:
    previous: tuple[Message, ...] = ()
    for turn in session.turns:
        messages = turn.request.messages
        assert messages[: len(previous)] == previous
        assert len(messages) > len(previous)
        assert messages[-1].role == "user"
        previous = messages


def test_code_sessions_prefix_structure(corpus_dir: Path) -> None:
    opts = CodeSessionsOptions(
        corpus=str(corpus_dir),
        context_tokens=700,
        num_repos=2,
        turns_min=3,
        turns_max=5,
        think_time_s=10.0,
    )
    workload = CodeSessionsWorkload(opts, seed=1)
    sessions = take(workload, 12)
    for session in sessions:
        assert 3 <= len(session.turns) <= 5
        first = session.turns[0].request.messages
        assert first[0] == Message("system", CODE_SYSTEM)
        assert_history_grows(session)
        assert session.turns[0].delay_s == 0.0
        assert all(t.delay_s >= 0 for t in session.turns)
        # Every turn adds the synthetic assistant reply and one user message.
        sizes = [len(t.request.messages) for t in session.turns]
        assert sizes == list(range(2, 2 + 2 * len(sizes), 2))
    assert any(t.delay_s > 0 for s in sessions for t in s.turns[1:])
    by_repo: dict[str, list[str]] = {}
    for session in sessions:
        by_repo.setdefault(session.tags["repo"], []).append(
            session.turns[0].request.messages[1].content
        )
    assert len(by_repo) == 2  # num_repos
    for repo, firsts in by_repo.items():
        context = workload.context(repo)
        assert len(context) >= 2  # 700 tokens of ~1.5 kB files
        quoted = common_prefix(firsts)
        for source in context:  # the quoted files are the shared part of the first message
            assert f"### {source.rel_path}\n" in quoted
            assert source.text in quoted


def test_fim_prefix_structure(corpus_dir: Path) -> None:
    workload = FimWorkload(
        FimOptions(corpus=str(corpus_dir), context_tokens=400, requests_min=3, requests_max=6),
        seed=2,
    )
    sessions = take(workload, 10)
    for session in sessions:
        repo, path = session.tags["repo"], session.tags["file"]
        prompts = [t.request.prompt for t in session.turns]
        assert 3 <= len(prompts) <= 6
        for prompt in prompts:
            assert prompt.startswith(f"{REPO_NAME}{repo}\n")
            assert f"{FILE_SEP}{path}\n{FIM_PREFIX}" in prompt
            assert prompt.endswith(FIM_MIDDLE) and prompt.count(FIM_SUFFIX) == 1
        befores = [p.split(FIM_SUFFIX)[0] for p in prompts]
        for a, b in itertools.pairwise(befores):
            assert b.startswith(a) and len(b) > len(a)  # the cursor moves down the file
        text = (corpus_dir / path).read_text()
        for before in befores:  # the file's text up to the cursor, whole
            assert text.startswith(before.split(FIM_PREFIX, 1)[1])
    same_repo = [s for s in sessions if s.tags["repo"] == sessions[0].tags["repo"]]
    context = workload.context(sessions[0].tags["repo"])
    assert all(s.turns[0].request.prompt.startswith(context) for s in same_repo)


def test_agent_prefix_structure_and_pauses(corpus_dir: Path) -> None:
    opts = AgentOptions(
        corpus=str(corpus_dir),
        tasks_min=2,
        tasks_max=3,
        steps_min=3,
        steps_max=5,
        tool_pause_s=0.01,
        human_pause_s=1000.0,
    )
    sessions = take(AgentWorkload(opts, seed=4), 6)
    for session in sessions:
        assert session.turns[0].request.messages[0] == Message("system", AGENT_SYSTEM)
        assert_history_grows(session)
        last = session.turns[-1].request.messages
        tasks = [m for m in last if m.role == "user" and not m.content.startswith("<tool_result")]
        results = [m for m in last if m.content.startswith("<tool_result")]
        assert 2 <= len(tasks) <= 3 and results
        assert all(m.role == "user" for m in results)
        assert any('name="run_tests"' in m.content and "FAILED" in m.content for m in results)
        long_pauses = [t for t in session.turns if t.delay_s > 10]
        assert len(long_pauses) == len(tasks) - 1  # a human pause before each later task
        assert all(t.delay_s < 10 for t in session.turns if t not in long_pauses)


def test_humaneval_prompts_behind_shared_prefix() -> None:
    workload = HumanEvalWorkload(HumanEvalOptions(num_shots=3), seed=0)
    sessions = list(workload.sessions())
    assert len(sessions) == NUM_PROBLEMS == len(workload.problems)
    prefix = few_shot_prefix(3)
    prompts = {p.task_id: p.prompt for p in workload.problems}
    assert len(prompts) == NUM_PROBLEMS
    seen = set()
    for session in sessions:
        (turn,) = session.turns
        request = turn.request
        assert request.kind == "completion" and request.prompt.startswith(prefix)
        assert request.prompt[len(prefix) :] == prompts[session.tags["task_id"]]
        seen.add(session.tags["task_id"])
    assert len(seen) == NUM_PROBLEMS
    order = [s.tags["task_id"] for s in sessions]
    assert order != sorted(order, key=lambda t: int(t.split("/")[1]))  # shuffled by the seed
    plain = HumanEvalWorkload(HumanEvalOptions(shuffle=False, repeat=2, num_shots=0))
    plain_order = [s.tags["task_id"] for s in plain.sessions()]
    assert plain_order[:NUM_PROBLEMS] == [p.task_id for p in plain.problems]
    assert len(plain_order) == 2 * NUM_PROBLEMS


def test_humaneval_problems_file_option(tmp_path: Path) -> None:
    path = tmp_path / "mini.jsonl"
    path.write_text('{"task_id": "X/0", "prompt": "def f():\\n", "entry_point": "f"}\n')
    workload = make_workload("humaneval", 0, {"problems_file": str(path), "num_shots": "1"})
    (session,) = list(workload.sessions())
    assert session.turns[0].request.prompt == few_shot_prefix(1) + "def f():\n"
    path.write_text("not json\n")
    with pytest.raises(InvalidRequestError):
        make_workload("humaneval", 0, {"problems_file": str(path)})


def test_default_corpus_is_the_standard_library() -> None:
    corpus = CodeCorpus.default()
    assert any(name == "json" for name in corpus.repo_names)
    workload = make_workload("code-sessions", 0, {"context_tokens": "500"})
    session = next(workload.sessions())
    assert "```" in session.turns[0].request.messages[1].content


def test_corpus_skips_small_files_and_rejects_empty_dirs(corpus_dir: Path, tmp_path: Path) -> None:
    corpus = CodeCorpus(corpus_dir)
    assert all("tiny.py" not in f for files in corpus.repos.values() for f in files)
    assert sorted(corpus.repos) == ["repo0/pkg", "repo1/pkg", "repo2/pkg"]
    with pytest.raises(InvalidRequestError):
        _ = CodeCorpus(tmp_path).repos
    with pytest.raises(InvalidRequestError):
        CodeCorpus(tmp_path / "missing")


def test_parse_options_converts_and_rejects() -> None:
    opts = parse_options(
        CodeSessionsOptions, {"turns-max": "9", "think_time_s": "0.5", "corpus": "none"}
    )
    assert (opts.turns_max, opts.think_time_s, opts.corpus) == (9, 0.5, None)
    assert parse_options(HumanEvalOptions, {"shuffle": "false"}).shuffle is False
    with pytest.raises(InvalidRequestError, match="unknown workload option"):
        parse_options(FimOptions, {"nope": "1"})
    with pytest.raises(InvalidRequestError, match="expected int"):
        parse_options(FimOptions, {"max_tokens": "many"})
    with pytest.raises(InvalidRequestError, match="unknown workload"):
        make_workload("nope")
