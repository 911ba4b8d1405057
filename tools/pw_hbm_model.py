#!/usr/bin/env python3
"""HBM bytes of the Triton pw forward GEMM per pass, computed (not measured) from its program
order with a model of the H200's L2: the programs run in launch order, each reading its A
row-block (x, plus the residual when there is one: the prologue reads both) and its B
column-block (the weights); a block read by an earlier program is an L2 hit while it is among
the most recently used blocks that fit in the L2 (LRU), else it comes from HBM again. Outputs
(out, and pre-act when kept) are written once.

    python tools/pw_hbm_model.py                 # ConvMixer-1536/20, batch 64, 32x32 tokens
    python tools/pw_hbm_model.py --rows 65536 --channels 1536 --l2-mib 50

Orders compared: the earlier 2-D grid (M-tile fastest: each A row-block is re-read once per
N-tile, because the whole column of M-tiles runs before the next N-tile), at BLOCK_N 64 and 128
(its autotuner could pick either), and the grouped order of pw._grouped_tile (GROUP_M M-tiles
walk every N-tile together) at BLOCK_N 128. The L2 model ignores the ~264 programs in flight at
once, which only shifts when a block is evicted by a few dozen programs.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict


def grouped_order(m_tiles, n_tiles, group_m):
    for pid in range(m_tiles * n_tiles):
        per_group = group_m * n_tiles
        first_m = (pid // per_group) * group_m
        rows = min(m_tiles - first_m, group_m)
        r = pid % per_group
        yield first_m + r % rows, r // rows


def m_fastest_order(m_tiles, n_tiles):
    for n in range(n_tiles):
        for m in range(m_tiles):
            yield m, n


def hbm_bytes(order, a_bytes, b_bytes, l2_bytes):
    """Bytes read from HBM by programs in `order` with an LRU L2 of `l2_bytes`."""
    cache: OrderedDict = OrderedDict()
    used = 0
    total = 0
    for m, n in order:
        for block, size in ((("a", m), a_bytes), (("b", n), b_bytes)):
            if block in cache:
                cache.move_to_end(block)
                continue
            total += size
            cache[block] = size
            used += size
            while used > l2_bytes:
                _, evicted = cache.popitem(last=False)
                used -= evicted
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64 * 32 * 32, help="M = N·H·W")
    ap.add_argument("--channels", type=int, default=1536)
    ap.add_argument("--elem", type=int, default=2, help="bytes per element (bf16: 2)")
    ap.add_argument("--l2-mib", type=float, default=50.0)
    ap.add_argument("--block-m", type=int, default=128)
    ap.add_argument("--group-m", type=int, default=8)
    args = ap.parse_args(argv)
    m, c, e = args.rows, args.channels, args.elem
    l2 = int(args.l2_mib * 2 ** 20)
    m_tiles = -(-m // args.block_m)
    print(f"pw forward, M = {m} rows, Cin = Cout = {c}, {e}-byte elements, L2 {args.l2_mib} MiB")
    print(f"{'order':<34} {'BLOCK_N':>7} {'inputs':>7} {'A+B read GB':>12} {'writes GB':>10} "
          f"{'total GB':>9}")
    for inputs, keep_pre in ((1, False), (2, True)):  # eval-like; training (residual, pre-act)
        a_bytes = args.block_m * c * e * inputs
        writes = m * c * e * (2 if keep_pre else 1)
        for name, bn, order in (
                ("2-D grid, M fastest (before)", 64, lambda nt: m_fastest_order(m_tiles, nt)),
                ("2-D grid, M fastest (before)", 128, lambda nt: m_fastest_order(m_tiles, nt)),
                (f"grouped, GROUP_M={args.group_m} (after)", 128,
                 lambda nt: grouped_order(m_tiles, nt, args.group_m))):
            n_tiles = -(-c // bn)
            reads = hbm_bytes(order(n_tiles), a_bytes, c * bn * e, l2)
            print(f"{name:<34} {bn:>7} {inputs:>7} {reads / 1e9:>12.3f} {writes / 1e9:>10.3f} "
                  f"{(reads + writes) / 1e9:>9.3f}")
    print(f"compulsory: inputs {m * c * e / 1e9:.3f} GB each, weights {c * c * e / 1e9:.4f} GB")


if __name__ == "__main__":
    main()
