"""Disaggregation across processes that know each other only through NATS: a real
nats-server, `kvrelay worker --role prefill` and `--role decode` and `kvrelay frontend` as
separate processes. The decode worker finds the prefill worker's transfer address in
discovery, blocks move over TCP, and greedy outputs equal the offline engine's."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import kvrelay
from tests.e2e.procs import nats_deployment
from tests.nats_server import find_nats_server, running_nats_server

MODEL = "tiny-llama"
ROLES = ("prefill", "decode")


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if find_nats_server() is None:
        pytest.skip("nats-server binary not installed")
    logs = tmp_path_factory.mktemp("disagg-nats")
    workers = [(f"{role}-0", ["--role", role, "--num-kv-blocks", "256"]) for role in ROLES]
    remote = ["--remote-prefill", "always", "--remote-prefill-timeout", "10"]
    with (
        running_nats_server() as nats_url,
        nats_deployment(nats_url, tiny_model, logs, workers, remote) as (base, _),
    ):
        yield base


def test_remote_prefill_over_nats_discovery_matches_offline_engine(
    server: str, tiny_model: Path
) -> None:
    llm = kvrelay.LLM(str(tiny_model), num_kv_blocks=256)
    rng = random.Random(5)
    params = kvrelay.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for _ in range(6):
        prompt = [rng.randrange(5, 250) for _ in range(rng.randrange(40, 160))]
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        }
        resp = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        info = out["kvrelay"]["disagg"]
        assert info is not None and info["prefill_worker"] == "prefill-0", out["kvrelay"]
        assert not info["fallback"] and info["transfer_bytes"] > 0, info
        expected = llm.generate(prompt, params)[0]
        assert out["choices"][0]["text"] == expected.text
