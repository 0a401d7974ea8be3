"""Block hash contract: chained, 64-bit, stable across processes, extra keys mixed in."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys

from kvrelay.kv.hashing import ROOT_PARENT_HASH, extra_keys_bytes, hash_block, hash_blocks


def test_chain_matches_single_block_hash() -> None:
    tokens = list(range(50))
    hashes = hash_blocks(tokens, 16)
    assert len(hashes) == 3  # only full blocks
    parent = ROOT_PARENT_HASH
    for i, h in enumerate(hashes):
        assert h == hash_block(parent, tokens[i * 16 : (i + 1) * 16])
        assert 0 <= h < 2**64
        parent = h


def test_incremental_extension_equals_full() -> None:
    tokens = [random.Random(0).randrange(100_000) for _ in range(100)]
    full = hash_blocks(tokens, 16)
    head = hash_blocks(tokens[:40], 16)
    tail = hash_blocks(tokens, 16, parent_hash=head[-1], start_block=len(head))
    assert head + tail == full


def test_prefix_sharing_and_divergence() -> None:
    a = hash_blocks(list(range(64)), 16)
    b = hash_blocks(list(range(40)) + [999] * 24, 16)
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]


def test_extra_keys_change_every_block() -> None:
    tokens = list(range(32))
    plain = hash_blocks(tokens, 16)
    salted = hash_blocks(tokens, 16, extra_keys_bytes(cache_salt="tenant-a"))
    lora = hash_blocks(tokens, 16, extra_keys_bytes(lora_name="tenant-a"))
    assert extra_keys_bytes() == b""
    assert all(p != s for p, s in zip(plain, salted, strict=True))
    assert salted != lora


def test_stable_across_processes_with_different_hash_seeds() -> None:
    code = "from kvrelay.kv.hashing import hash_blocks; print(hash_blocks(list(range(48)), 16))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {str(hash_blocks(list(range(48)), 16)) + "\n"}


def test_known_value_pins_the_contract() -> None:
    # The spec, written out independently: BLAKE2b-64(parent u64 LE || tokens u32 LE || extra).
    # Changing this value breaks every router/engine pairing across versions.
    data = (0).to_bytes(8, "little") + b"".join(t.to_bytes(4, "little") for t in range(16))
    expected = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    assert hash_block(0, list(range(16))) == expected == 10251598853290956434
