"""Overhead of ftmem's erasure wrappers over bare zfec, on the same buffers in the same run.

Encodes ``--size-mb`` of data as stripes of k chunks (the SMP's unit of work) with raw ``zfec.Encoder.encode``
and with ``encode_parity``, then rebuilds the f lowest data blocks of every stripe from the rest with raw
``zfec.Decoder.decode`` and with ``recover``. A third column runs the layout-level ``rebuild_stripe`` that the
SMP calls. Throughput is GB/s of data (k chunks per stripe), best of ``--repeat``.

    python bench/bench_erasure.py --size-mb 256 --n 4 --f 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import zfec

from ftmem.erasure import StripeLayout, choose_chunk_size, encode_parity, rebuild_stripe, recover


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm caches and page in the buffers
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="data bytes encoded per pass (MiB)")
    parser.add_argument("--n", type=int, default=4, help="EC group size")
    parser.add_argument("--f", type=int, default=1, help="parity blocks per stripe")
    parser.add_argument("--chunk-kb", type=int, default=0, help="chunk size (KiB); default choose_chunk_size")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    n, f = args.n, args.f
    k = n - f
    per_member = (args.size_mb << 20) // k
    chunk = args.chunk_kb << 10 or choose_chunk_size(per_member, k)
    layout = StripeLayout(n, f, chunk, (per_member,) * n)
    stripes = layout.rounds * k  # one round is n stripes; use k of them per round to cover exactly size-mb
    total = stripes * k * chunk
    data = memoryview(np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8))
    blocks = [tuple(data[(s * k + i) * chunk : (s * k + i + 1) * chunk] for i in range(k)) for s in range(stripes)]
    parity_nums = tuple(range(k, n))
    encoder, decoder = zfec.Encoder(k, n), zfec.Decoder(k, n)
    parity = [encoder.encode(b, parity_nums) for b in blocks]

    # Decode input: data blocks f..k-1 and all f parity blocks, i.e. the f lowest data blocks lost.
    kept = tuple(range(f, n))
    survivors = [b[f:] + tuple(p) for b, p in zip(blocks, parity)]
    members = {layout.block_number(0, m): m for m in range(n)}  # stripe 0's block number -> member
    available = [{members[num]: blk for num, blk in zip(kept, s)} for s in survivors]
    lost_members = [members[num] for num in range(f)]

    runs = {
        "encode": (
            lambda: [encoder.encode(b, parity_nums) for b in blocks],
            lambda: [encode_parity(k, n, b, range(f)) for b in blocks],
            lambda: [rebuild_stripe(layout, 0, dict(zip(layout.data_members(0), b)), want=layout.parity_members(0))
                     for b in blocks],
        ),
        "decode": (
            lambda: [decoder.decode(s, kept) for s in survivors],
            lambda: [recover(k, n, dict(zip(kept, s))) for s in survivors],
            lambda: [rebuild_stripe(layout, 0, a, want=lost_members) for a in available],
        ),
    }
    check = recover(k, n, dict(zip(kept, survivors[-1])))
    assert all(bytes(check[i]) == bytes(blocks[-1][i]) for i in range(k)), "recover disagrees with the data"

    print(f"n={n} f={f} k={k} chunk={chunk >> 10} KiB stripes={stripes} data={total / 2**20:.0f} MiB "
          f"(best of {args.repeat})")
    print(f"{'op':<8}{'zfec GB/s':>11}{'ftmem GB/s':>12}{'ratio':>8}{'rebuild_stripe GB/s':>21}{'ratio':>8}")
    for op, (raw, ours, stripe_level) in runs.items():
        rates = [total / best_seconds(fn, args.repeat) / 1e9 for fn in (raw, ours, stripe_level)]
        print(f"{op:<8}{rates[0]:>11.2f}{rates[1]:>12.2f}{rates[1] / rates[0]:>8.3f}"
              f"{rates[2]:>21.2f}{rates[2] / rates[0]:>8.3f}")


if __name__ == "__main__":
    main()
