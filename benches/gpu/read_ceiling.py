#!/usr/bin/env python3
"""What a restore from the page cache can reach on this machine, measured without runner.

    read_ceiling.py FILE

For 1, 4, 8 and 16 threads, each taking 4 MiB pieces of FILE in turn (as runner's reader
threads do):
  (a) pread into reused pageable buffers: the page cache's own read bandwidth;
  (b) pread into reused pinned buffers, no copies: what pinned memory costs the reads;
  (c) H2D copies from the pinned ring, no reads: what the copies cost on their own;
  (d) pread into pinned buffers, each copied to the GPU on the thread's own stream with a
      ring of two buffers guarded by events: the same pipeline as runner's `pinned` path,
      written in PyTorch;
  (e) as (d), but each piece is read into a pageable buffer and copied into the pinned one
      by the thread (a bounce): faster than (d) if the kernel (gVisor's sentry, say) is slow
      at writing into pinned pages but not into ordinary ones.
(b) and (c) tell which half of (d) holds it back; (e) whether a bounce gets round it. Prints a markdown table. FILE should
already be in the page cache (it is read once first so that it is).
"""
import os
import sys
import threading
import time

import torch

PIECE = 4 << 20


def run(path, threads, pinned, read=True, copy=None, bounce=False):
    copy = pinned if copy is None else copy
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    pieces = list(range(0, size, PIECE))
    lock = threading.Lock()
    cursor = [0]
    dest = torch.empty(size, dtype=torch.uint8, device="cuda") if copy else None

    def take():
        with lock:
            i = cursor[0]
            cursor[0] += 1
        return pieces[i] if i < len(pieces) else None

    def worker():
        ring = []
        for _ in range(2):
            b = torch.empty(PIECE, dtype=torch.uint8, pin_memory=pinned)
            ring.append((b, b.numpy(), torch.cuda.Event() if copy else None))
        stream = torch.cuda.Stream() if copy else None
        staging = torch.empty(PIECE, dtype=torch.uint8) if bounce else None
        turn = 0
        while (at := take()) is not None:
            b, view, event = ring[turn % 2]
            turn += 1
            if event is not None:
                event.synchronize()
            n = min(PIECE, size - at)
            if read and bounce:
                n = os.preadv(fd, [memoryview(staging.numpy())[:n]], at)
                b[:n].copy_(staging[:n])
            elif read:
                n = os.preadv(fd, [memoryview(view)[:n]], at)
            if copy:
                with torch.cuda.stream(stream):
                    dest[at : at + n].copy_(b[:n], non_blocking=True)
                    event.record(stream)
        if stream is not None:
            stream.synchronize()

    started = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    os.close(fd)
    return size / seconds / 1e9


def main():
    path = sys.argv[1]
    run(path, 8, False)  # into the page cache, and the threads' first allocations
    print(f"Page-cache ceilings for {os.path.basename(path)} ({os.path.getsize(path) / 1e9:.2f} GB), "
          f"4 MiB pieces, PyTorch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print("| threads | (a) pread into pageable buffers | (b) pread into pinned buffers | (c) H2D copies from pinned buffers | (d) pread into pinned buffers + H2D copies (runner's `pinned` pipeline) | (e) pread into pageable, copy into pinned, H2D (a bounce) |")
    print("|---|---|---|---|---|---|")
    # One thread per copy into pinned memory, as a reader thread would do it.
    torch.set_num_threads(1)
    for threads in (1, 4, 8, 16):
        plain = max(run(path, threads, False) for _ in range(2))
        pinned_reads = max(run(path, threads, True, copy=False) for _ in range(2))
        copies = max(run(path, threads, True, read=False) for _ in range(2))
        piped = max(run(path, threads, True) for _ in range(2))
        bounced = max(run(path, threads, True, bounce=True) for _ in range(2))
        print(f"| {threads} | {plain:.1f} GB/s | {pinned_reads:.1f} GB/s | {copies:.1f} GB/s | {piped:.1f} GB/s | {bounced:.1f} GB/s |")


if __name__ == "__main__":
    main()
