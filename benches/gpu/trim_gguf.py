#!/usr/bin/env python3
"""Writes a copy of a Llama GGUF keeping only its first N transformer blocks.

    trim_gguf.py IN.gguf OUT.gguf N

The real SmolLM2 GGUF (98 MB) does not fit the GPU machine's 64 MiB carry limit; its first
blocks, with the real embeddings, tokenizer and quantization types, do. The result is a
smaller but real model: the GPU script compares runner on CUDA with runner on the CPU and
with transformers on it. Standard library only; GGUF v2/v3, little-endian.
"""
import struct
import sys

SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self):
        n = self.take("Q")
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def skip_value(self, kind):
        if kind in SCALAR:
            self.take(SCALAR[kind])
        elif kind == 8:
            self.string()
        elif kind == 9:
            item, n = self.take("I"), self.take("Q")
            if item in SCALAR:
                self.pos += n * struct.calcsize("<" + SCALAR[item])
            else:
                for _ in range(n):
                    self.skip_value(item)
        else:
            raise ValueError(f"unknown GGUF value type {kind} at byte {self.pos}")


def pack_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def main(src, dst, keep):
    data = open(src, "rb").read()
    r = Reader(data)
    if data[:4] != b"GGUF":
        sys.exit(f"{src}: not a GGUF file")
    r.pos = 4
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    kvs, alignment = [], 32
    for _ in range(n_kv):
        start = r.pos
        key = r.string()
        kind = r.take("I")
        value_at = r.pos
        r.skip_value(kind)
        raw = data[start:r.pos]
        if key == "llama.block_count":
            raw = pack_string(key) + struct.pack("<II", kind, keep)
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, value_at)[0]
        kvs.append(raw)
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        kind, offset = r.take("I"), r.take("Q")
        tensors.append((name, dims, kind, offset))
    data_start = (r.pos + alignment - 1) // alignment * alignment
    offsets = sorted({t[3] for t in tensors}) + [len(data) - data_start]

    def size_of(offset):  # tensors are stored back to back, each padded to the alignment
        return offsets[offsets.index(offset) + 1] - offset

    def kept(name):
        return not name.startswith("blk.") or int(name.split(".")[1]) < keep

    chosen = [t for t in tensors if kept(t[0])]
    infos, blobs, at = [], [], 0
    for name, dims, kind, offset in chosen:
        blob = data[data_start + offset:data_start + offset + size_of(offset)]
        infos.append(pack_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, at))
        blob += b"\0" * (-len(blob) % alignment)
        blobs.append(blob)
        at += len(blob)
    head = b"GGUF" + struct.pack("<IQQ", version, len(chosen), len(kvs)) + b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    with open(dst, "wb") as f:
        f.write(head)
        for blob in blobs:
            f.write(blob)
    print(f"{dst}: {keep} of the blocks, {len(chosen)} of {len(tensors)} tensors, {len(head) + at} bytes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
