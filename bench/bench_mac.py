"""Peer message MAC: ftmem's ChaCha20-Poly1305 tag (PeerCodec) vs HMAC-SHA256 and keyed BLAKE3, per byte.

The erasure code's data frames are MAC'd once by the serving SMP and once by the receiving one, so this is paid
twice per byte of every round. Each variant MACs the same 16 MiB reply (four 4 MiB blobs and a header,
length-prefixed as PeerCodec does) `--reps` times, three passes, interleaved; wall GB/s and CPU GB/s (process
CPU time) are printed per pass. CPU per byte is what counts on a node whose cores training uses. Keyed BLAKE3
(ftmem's MAC before) is included when the `blake3` package is installed.

    .venv/bin/python bench/bench_mac.py
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import resource
import time
from typing import Callable

from ftmem.smp.peer import PeerCodec


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _streaming(make: Callable[[], object]) -> Callable[[list[bytes]], bytes]:
    def mac(parts: list[bytes]) -> bytes:
        h = make()
        for p in parts:
            h.update(len(p).to_bytes(8, "little"))
            h.update(p)
        return h.digest()
    return mac


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=16, help="16 MiB replies per pass")
    args = p.parse_args()
    key = os.urandom(32)
    codec = PeerCodec(key, "bench", 0)
    parts = [b"h" * 64, *(os.urandom(4 << 20) for _ in range(4))]
    nbytes = args.reps * sum(len(b) for b in parts)
    variants = {
        "ChaCha20-Poly1305 tag (ftmem)": lambda ps: codec.pack("reply", 1, ps)[0],
        "HMAC-SHA256": _streaming(lambda: hmac.new(key, digestmod=hashlib.sha256)),
    }
    try:
        from blake3 import blake3
        variants["keyed BLAKE3, one thread"] = _streaming(lambda: blake3(key=key))
    except ImportError:
        print("(blake3 not installed: keyed BLAKE3 left out)")
    print(f"{os.cpu_count()} cores; {nbytes / 2**20:.0f} MiB per pass")
    for rep in range(3):
        for name, mac in variants.items():
            wall, cpu = time.perf_counter(), _cpu()
            for _ in range(args.reps):
                mac(parts)
            wall, cpu = time.perf_counter() - wall, _cpu() - cpu
            print(f"pass {rep}  {name:30s} {nbytes / wall / 1e9:5.2f} GB/s wall  {nbytes / cpu / 1e9:5.2f} GB/CPU-s")


if __name__ == "__main__":
    main()
