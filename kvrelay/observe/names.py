"""Every metric name kvrelay exports, one comment each, prefix `kvrelay_`.

Owns: the names and the label names. Labels come only from the fixed set below. Counters
are token- or request-weighted totals (take ratios over rates, never export a ratio gauge
of counters). Imports nothing.
"""

from __future__ import annotations

# Label names (the only ones allowed).
LABEL_MODEL = "model"
LABEL_WORKER = "worker"
LABEL_ROLE = "role"
LABEL_WORKLOAD = "workload"
LABEL_REASON = "reason"  # a placement decision's reason: the fixed set router.placement.REASONS

# -- frontend: requests -----------------------------------------------------------------------
# Generation requests received (completions + chat), before validation.
REQUESTS_TOTAL = "kvrelay_requests_total"
# Requests that ended with a 4xx (other than 503) or a failed stream.
REQUESTS_FAILED_TOTAL = "kvrelay_requests_failed_total"
# Requests answered 503 because no worker could take them (none live, all saturated).
REQUESTS_REJECTED_TOTAL = "kvrelay_requests_rejected_total"
# Requests whose client went away before the end; their KV blocks were freed.
REQUESTS_CANCELLED_TOTAL = "kvrelay_requests_cancelled_total"
# Requests being served by the frontend right now.
REQUESTS_INFLIGHT = "kvrelay_requests_inflight"

# -- frontend: tokens (per serving worker) ----------------------------------------------------
# Prompt tokens of served requests (F0 of the hit-rate ledger).
PROMPT_TOKENS_TOTAL = "kvrelay_prompt_tokens_total"
# Prompt tokens the engine served from its prefix cache (F4, realized hits).
CACHED_PROMPT_TOKENS_TOTAL = "kvrelay_cached_prompt_tokens_total"
# Output tokens generated.
GENERATION_TOKENS_TOTAL = "kvrelay_generation_tokens_total"

# -- frontend: latency ------------------------------------------------------------------------
# Arrival at the frontend until the first output token reached it.
TIME_TO_FIRST_TOKEN_SECONDS = "kvrelay_time_to_first_token_seconds"
# Gap between consecutive output tokens at the frontend (a chunk of k tokens counts k gaps of 1/k).
INTER_TOKEN_LATENCY_SECONDS = "kvrelay_inter_token_latency_seconds"
# Arrival at the frontend until the last token (or error) left it.
REQUEST_LATENCY_SECONDS = "kvrelay_request_latency_seconds"
# Engine-measured: arrival on the worker until first scheduled.
QUEUE_TIME_SECONDS = "kvrelay_queue_time_seconds"
# Engine-measured: first scheduled until the first output token.
PREFILL_TIME_SECONDS = "kvrelay_prefill_time_seconds"
# Engine-measured: first output token until finished.
DECODE_TIME_SECONDS = "kvrelay_decode_time_seconds"

# -- workers, from their load reports ---------------------------------------------------------
# Workers live in discovery.
WORKERS = "kvrelay_workers"
# Requests in the worker's running batch.
WORKER_RUNNING_REQUESTS = "kvrelay_worker_running_requests"
# Requests waiting in the worker's queue.
WORKER_WAITING_REQUESTS = "kvrelay_worker_waiting_requests"
# KV blocks the worker's cache holds in total.
WORKER_KV_BLOCKS = "kvrelay_worker_kv_blocks"
# KV blocks free (including evictable cached blocks).
WORKER_KV_FREE_BLOCKS = "kvrelay_worker_kv_free_blocks"
# Fraction of KV blocks in use by running requests (a usage level, not a ratio of counters).
WORKER_KV_USAGE = "kvrelay_worker_kv_usage"
# Prompt tokens the worker looked up in its prefix cache, since it started.
WORKER_PREFIX_QUERY_TOKENS_TOTAL = "kvrelay_worker_prefix_query_tokens_total"
# Prompt tokens the worker found in its prefix cache, since it started.
WORKER_PREFIX_HIT_TOKENS_TOTAL = "kvrelay_worker_prefix_hit_tokens_total"
# Requests the worker preempted (recomputed later) for lack of KV memory.
WORKER_PREEMPTIONS_TOTAL = "kvrelay_worker_preemptions_total"
# Prefill role: prompt tokens of the remote prefills the worker is running (its queue depth).
WORKER_QUEUED_PREFILL_TOKENS = "kvrelay_worker_queued_prefill_tokens"

# -- hit-rate ledger (per request, token-weighted; take ratios of two rate()s) ----------------
# Requests whose funnel the ledger recorded (routed, prefill finished).
LEDGER_REQUESTS_TOTAL = "kvrelay_ledger_requests_total"
# F0: prompt tokens of recorded requests.
LEDGER_PROMPT_TOKENS_TOTAL = "kvrelay_ledger_prompt_tokens_total"
# F1: prompt tokens in blocks the cluster had computed before (the infinite-cache ideal).
LEDGER_SEEN_TOKENS_TOTAL = "kvrelay_ledger_seen_tokens_total"
# F2: prompt tokens cached on the best worker at routing time.
LEDGER_REACHABLE_TOKENS_TOTAL = "kvrelay_ledger_reachable_tokens_total"
# F3: prompt tokens cached on the chosen worker per the router's index (predicted hits).
LEDGER_PREDICTED_TOKENS_TOTAL = "kvrelay_ledger_predicted_tokens_total"
# F4: prompt tokens the engine served from its cache (realized hits).
LEDGER_REALIZED_TOKENS_TOTAL = "kvrelay_ledger_realized_tokens_total"
# Realized hits the index did not predict (the index lagged behind the engine).
LEDGER_UNPREDICTED_HIT_TOKENS_TOTAL = "kvrelay_ledger_unpredicted_hit_tokens_total"
# Estimated prefill seconds the realized hits saved (hits x the worker's seconds per token).
LEDGER_PREFILL_SECONDS_SAVED_TOTAL = "kvrelay_ledger_prefill_seconds_saved_total"
# F0 - F1: tokens never computed anywhere before (plus the uncacheable tail).
LEDGER_LOST_COLD_TOKENS_TOTAL = "kvrelay_ledger_lost_cold_tokens_total"
# F1 - F2: tokens computed before but evicted from every worker.
LEDGER_LOST_CAPACITY_TOKENS_TOTAL = "kvrelay_ledger_lost_capacity_tokens_total"
# F2 - F3: tokens cached on another worker than the chosen one (load or the policy won).
LEDGER_LOST_ROUTING_TOKENS_TOTAL = "kvrelay_ledger_lost_routing_tokens_total"
# F3 - F4: predicted hits the engine did not have (lost or late events, eviction meanwhile).
LEDGER_LOST_STALE_INDEX_TOKENS_TOTAL = "kvrelay_ledger_lost_stale_index_tokens_total"
# Per request: realized hits / prompt tokens (0.05-wide buckets).
REQUEST_HIT_RATIO = "kvrelay_request_hit_ratio"
# Per request: estimated prefill seconds its realized hits saved.
REQUEST_PREFILL_SECONDS_SAVED = "kvrelay_request_prefill_seconds_saved"

# -- router ------------------------------------------------------------------------------------
# KV event batches the router applied from a worker (dumps included).
ROUTER_KV_EVENT_BATCHES_TOTAL = "kvrelay_router_kv_event_batches_total"
# Full dumps the router asked a worker for (on joining, after an event-id gap).
ROUTER_KV_DUMPS_TOTAL = "kvrelay_router_kv_dumps_total"
# KV blocks the router's index says a worker caches.
ROUTER_INDEXED_BLOCKS = "kvrelay_router_indexed_blocks"

# -- disaggregation (frontend: placement; decode workers' reports of each transfer) ------------
# Placement decisions for requests on decode workers, by reason (remote_faster / forced: remote).
DISAGG_PLACEMENT_DECISIONS_TOTAL = "kvrelay_disagg_placement_decisions_total"
# Remote prefills that ended (imported in full, or fell back), per prefill worker.
DISAGG_TRANSFERS_TOTAL = "kvrelay_disagg_transfers_total"
# KV payload bytes the decode workers imported from a prefill worker.
DISAGG_TRANSFER_BYTES_TOTAL = "kvrelay_disagg_transfer_bytes_total"
# Wall seconds of remote prefills, request to last import (bandwidth: rate(bytes) / rate(seconds)).
DISAGG_TRANSFER_SECONDS_TOTAL = "kvrelay_disagg_transfer_seconds_total"
# Per remote prefill: bytes imported / its wall seconds (compute on the prefill side included).
DISAGG_TRANSFER_BANDWIDTH_BYTES_PER_SECOND = "kvrelay_disagg_transfer_bandwidth_bytes_per_second"
# Remote prefills that failed or timed out; the decode worker prefilled the rest locally.
DISAGG_FALLBACKS_TOTAL = "kvrelay_disagg_fallbacks_total"
