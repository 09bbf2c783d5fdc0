#!/usr/bin/python3
"""Random 4 KiB reads over NBD, each timed alone (one request in flight).

    remote-boot.py URI COUNT SEED IMAGE

Reads COUNT blocks of 4096 bytes at offsets drawn uniformly (4 KiB aligned) from the
export by a generator seeded with SEED, one after the other, and prints
`p50_ms p99_ms max_ms total_s`. Every block read is then compared with the same bytes of
IMAGE (the raw image, read locally, outside the timing); a difference is an error.
Used by benches/remote-boot.sh; needs python3-libnbd (`import nbd`).
"""
import random
import sys
import time

import nbd

uri, count, seed, image = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(seed)
offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
lat, blocks = [], []
start = time.monotonic()
for off in offsets:
    t = time.monotonic()
    blocks.append(h.pread(4096, off))
    lat.append(time.monotonic() - t)
total = time.monotonic() - start
h.shutdown()
with open(image, "rb") as f:
    for off, got in zip(offsets, blocks):
        f.seek(off)
        if f.read(4096) != got:
            sys.exit(f"{uri}: 4 KiB at offset {off} differs from {image}")
lat.sort()
pick = lambda q: lat[min(len(lat) - 1, max(0, -(-len(lat) * q // 100) - 1))] * 1000
print(f"{pick(50):.1f} {pick(99):.1f} {lat[-1] * 1000:.1f} {total:.2f}")
