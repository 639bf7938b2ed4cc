"""Peer message MAC: ftmem's keyed BLAKE3 (one thread) vs HMAC-SHA256 and vs BLAKE3 on all cores, side by side.

The erasure code's data frames are MAC'd once by the serving SMP and once by the receiving one, so this is paid
twice per byte of every round. Each variant MACs the same 16 MiB reply (four 4 MiB chunks, length-prefixed as
ftmem's PeerCodec does) `--reps` times, three passes, interleaved; wall GB/s and CPU GB/s (process CPU time) are
printed per pass. CPU per byte is what counts on a node whose cores training uses.

    .venv/bin/python bench/bench_mac.py
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import resource
import time

from blake3 import blake3


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=16, help="16 MiB replies per pass")
    args = p.parse_args()
    key = os.urandom(32)
    blobs = [os.urandom(4 << 20) for _ in range(4)]
    nbytes = args.reps * sum(len(b) for b in blobs)
    variants = {
        "HMAC-SHA256": lambda: hmac.new(key, digestmod=hashlib.sha256),
        "keyed BLAKE3, one thread (ftmem)": lambda: blake3(key=key),
        "keyed BLAKE3, max_threads=AUTO": lambda: blake3(key=key, max_threads=blake3.AUTO),
    }
    print(f"{os.cpu_count()} cores; {nbytes / 2**20:.0f} MiB per pass")
    for rep in range(3):
        for name, make in variants.items():
            wall, cpu = time.perf_counter(), _cpu()
            for _ in range(args.reps):
                mac = make()
                for b in blobs:
                    mac.update(len(b).to_bytes(8, "little"))
                    mac.update(b)
                mac.digest()
            wall, cpu = time.perf_counter() - wall, _cpu() - cpu
            print(f"pass {rep}  {name:34s} {nbytes / wall / 1e9:5.2f} GB/s wall  {nbytes / cpu / 1e9:5.2f} GB/CPU-s")


if __name__ == "__main__":
    main()
