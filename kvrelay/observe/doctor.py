"""`kvrelay doctor --url URL`: an end-to-end self-check of KV-aware routing and the hit-rate
ledger of a running kvrelay server, over HTTP only.

Owns: `run_doctor` (the checks, as `Check` results, against any `JsonClient`),
`UrllibClient` (stdlib HTTP, so the doctor needs nothing beyond Python) and `doctor_main`
(the command; exit code 0 when every check passes, 1 otherwise). Imports nothing from
kvrelay: it knows the server through `/v1/models`, `/kvrelay/workers` and the `kvrelay`
extension of a completion response (docs/serving.md, docs/ledger.md).

The checks, in order (later ones are skipped when an earlier one makes them meaningless):
1. workers are registered and each worker's block size equals the router's;
2. every worker publishes KV events (not started with `--no-kv-events`);
3. a probe prompt (unique, a few blocks long) is served and its blocks reach the router as
   KV events within `settle_s`;
4. the same probe again hits the cache on the worker holding it;
5. on that second probe the router's prediction equals the engine's realized hits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

PROBE_WORDS = 64  # unique words in the probe: several blocks with any tokenizer
DEFAULT_SETTLE_S = 5.0
POLL_S = 0.1


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class DoctorError(Exception):
    """The server could not be asked (unreachable, HTTP error, unexpected body)."""


class JsonClient(Protocol):
    def get(self, path: str) -> Any: ...

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any: ...


class UrllibClient:
    """JSON over HTTP with the standard library; raises DoctorError with the reason."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0):
        url = base_url.rstrip("/")
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.api_key = api_key
        self.timeout_s = timeout_s

    def get(self, path: str) -> Any:
        return self._send(urllib.request.Request(self.base_url + path, headers=self._auth()))

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            headers={**self._auth(), **headers, "Content-Type": "application/json"},
            method="POST",
        )
        return self._send(request)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _send(self, request: urllib.request.Request) -> Any:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")[:500]
            raise DoctorError(f"{request.full_url}: HTTP {exc.code}: {text}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DoctorError(f"{request.full_url}: {exc}") from exc


def run_doctor(
    client: JsonClient,
    model: str | None = None,
    *,
    settle_s: float = DEFAULT_SETTLE_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[Check]:
    """Run the checks in order; stops at the first failure that makes the rest moot."""
    checks: list[Check] = []
    model = model or _first_model(client)
    workers = _workers(client, model)
    checks.append(_check_block_sizes(model, workers))
    checks.append(_check_events_enabled(workers))
    if not all(c.ok for c in checks):
        return checks
    before = {w["worker_id"]: _stored(w) for w in workers}
    prompt = probe_prompt(uuid.uuid4().hex)
    first = _send_probe(client, model, prompt)
    worker_id = str(first["worker_id"])
    deadline = clock() + settle_s
    while True:
        now_stored = {w["worker_id"]: _stored(w) for w in _workers(client, model)}
        if now_stored.get(worker_id, 0) > before.get(worker_id, 0) or clock() >= deadline:
            break
        sleep(POLL_S)
    checks.append(_check_events_arrived(worker_id, before, now_stored, settle_s))
    if not checks[-1].ok:
        return checks
    second = _send_probe(client, model, prompt)
    checks.append(_check_hit(first, second))
    checks.append(_check_prediction(second))
    return checks


def _first_model(client: JsonClient) -> str:
    data = client.get("/v1/models").get("data") or []
    if not data:
        raise DoctorError("the server lists no model (GET /v1/models); are workers running?")
    return str(data[0]["id"])


def _workers(client: JsonClient, model: str) -> list[dict[str, Any]]:
    body = client.get("/kvrelay/workers")
    workers = [w for w in body.get("workers", []) if w.get("model") == model]
    if not workers:
        raise DoctorError(f"no worker of {model!r} is registered (GET /kvrelay/workers)")
    if any(w.get("router") is None for w in workers):
        raise DoctorError("this server reports no router state per worker; is it kvrelay?")
    return workers


def _stored(worker: dict[str, Any]) -> int:
    return int(worker["router"]["num_blocks_stored"])


def _check_block_sizes(model: str, workers: Sequence[dict[str, Any]]) -> Check:
    name = "block sizes match"
    bad = [
        f"{w['worker_id']} uses {w['block_size']}, the router {w['router']['router_block_size']}"
        for w in workers
        if w["block_size"] != w["router"]["router_block_size"]
    ]
    if bad:
        return Check(
            name,
            False,
            f"router and worker block sizes differ for {model!r}: {'; '.join(bad)}. Prompt "
            "hashes can never match those workers' blocks: start the router (frontend "
            "--router-block-size) and the workers (--block-size) with the same block size",
        )
    sizes = sorted({int(w["block_size"]) for w in workers})
    return Check(name, True, f"{len(workers)} workers, block size {sizes[0]}")


def _check_events_enabled(workers: Sequence[dict[str, Any]]) -> Check:
    name = "workers publish KV events"
    off = [str(w["worker_id"]) for w in workers if not w.get("kv_events", True)]
    if off:
        return Check(
            name,
            False,
            f"{', '.join(off)} publish no KV events (started with --no-kv-events): the "
            "router cannot see their caches, so its predictions and routing are blind",
        )
    return Check(name, True, "every worker has KV events enabled")


def probe_prompt(nonce: str) -> str:
    """A prompt no earlier request shares a block with: the nonce, then words made of it."""
    words = " ".join(f"{nonce[i % 28 : i % 28 + 4]}{i}" for i in range(PROBE_WORDS))
    return f"kvrelay doctor probe {nonce}: {words}"


def _send_probe(client: JsonClient, model: str, prompt: str) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "kvrelay": {"router": "kv"},
    }
    resp = client.post("/v1/completions", body, {"x-kvrelay-workload": "doctor"})
    ledger = (resp.get("kvrelay") or {}).get("ledger")
    if not isinstance(ledger, dict):
        raise DoctorError("the completion response carries no kvrelay.ledger row")
    return ledger


def _check_events_arrived(
    worker_id: str, before: dict[str, int], after: dict[str, int], settle_s: float
) -> Check:
    name = "KV events reach the router"
    got = after.get(worker_id, 0) - before.get(worker_id, 0)
    if got <= 0:
        return Check(
            name,
            False,
            f"{worker_id} cached the probe's blocks but no KV event announcing them reached "
            f"the router within {settle_s:.0f}s: the worker publishes no KV events or the "
            "event plane drops them",
        )
    return Check(name, True, f"{worker_id} announced {got} new blocks")


def _check_hit(first: dict[str, Any], second: dict[str, Any]) -> Check:
    name = "second probe hits the cache"
    realized = int(second["num_realized_tokens"])
    prompt = int(second["num_prompt_tokens"])
    if realized <= 0:
        return Check(
            name,
            False,
            f"the repeated probe hit 0 of {prompt} prompt tokens (first on "
            f"{first['worker_id']}, second on {second['worker_id']}, route reason "
            f"{second['route_reason']!r}); the router sent it where its prefix is not cached",
        )
    return Check(name, True, f"{realized} of {prompt} prompt tokens from cache")


def _check_prediction(row: dict[str, Any]) -> Check:
    name = "prediction equals realized"
    predicted = int(row["num_predicted_tokens"]) - int(row["num_unpredicted_hit_tokens"])
    realized = int(row["num_realized_tokens"])
    if predicted != realized:
        return Check(
            name,
            False,
            f"the router predicted {predicted} cached tokens on {row['worker_id']}, the "
            f"engine realized {realized}: the router's index disagrees with the engine's "
            "cache (lagging or lost events, or different hashing)",
        )
    return Check(name, True, f"predicted {predicted} = realized {realized} tokens")


def doctor_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvrelay doctor`; returns 0 when every check passes."""
    p = argparse.ArgumentParser(
        prog="kvrelay doctor", description="Check KV-aware routing and the hit-rate ledger."
    )
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--api-key", default=None)
    p.add_argument("--settle", type=float, default=DEFAULT_SETTLE_S, help="seconds to wait")
    args = p.parse_args(argv)
    try:
        checks = run_doctor(UrllibClient(args.url, args.api_key), args.model, settle_s=args.settle)
    except DoctorError as exc:
        print(f"kvrelay doctor: FAIL: {exc}", file=sys.stderr)
        return 1
    for check in checks:
        print(f"[{'PASS' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    failed = [c for c in checks if not c.ok]
    print("kvrelay doctor: " + ("FAILED" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(doctor_main())
