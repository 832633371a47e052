#!/usr/bin/env python3
"""Writes the seed inputs of tests/fuzz/corpus/{wire,safetensors,config} (the committed corpus).

Deterministic and dependency-free: protobuf messages are encoded by hand (tag, varint, length-delimited), so
the seeds need neither generated code nor a protobuf package. Crash reproducers found by fuzzing are not
written here; they are committed as crash-* files next to the seeds and kept when this script is rerun.

Usage: make_seeds.py [--out tests/fuzz/corpus]
"""
import argparse
import json
import os
import struct

# mqa.v1.DataType
F32, BF16, F16, BOOL, U8 = 1, 2, 3, 4, 5


def varint(n):
    n &= (1 << 64) - 1  # int64 fields: negative values take ten bytes, as protobuf encodes them
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_varint(num, value):
    return varint(num << 3) + varint(value)


def field_bytes(num, data):
    return varint((num << 3) | 2) + varint(len(data)) + data


def tensor(dtype, shape, data):
    """mqa.v1.Tensor: dtype = 1, shape = 2 (packed), data = 3."""
    packed = b"".join(varint(d) for d in shape)
    msg = field_varint(1, dtype) if dtype else b""
    if shape:
        msg += field_bytes(2, packed)
    return msg + field_bytes(3, data)


def floats(n, dtype=F32):
    if dtype == F32:
        return b"".join(struct.pack("<f", 0.25 * (i % 7) - 0.5) for i in range(n))
    return b"".join(struct.pack("<H", 0x3C00 if dtype == F16 else 0x3F80) for _ in range(n))


def forward(x, layer=0, kv=None, return_cache=False, bias=None, mask=None, causal=None, needs_weights=False):
    """mqa.v1.ForwardRequest (selector byte 0)."""
    msg = field_bytes(1, b"m") + (field_varint(2, layer) if layer else b"") + field_bytes(3, x)
    if kv is not None:
        msg += field_bytes(4, field_bytes(1, kv[0]) + field_bytes(2, kv[1]))
    if return_cache:
        msg += field_varint(5, 1)
    if bias is not None:
        msg += field_bytes(6, bias)
    if mask is not None:
        msg += field_bytes(7, mask)
    if causal is not None:
        msg += field_varint(8, int(causal))
    if needs_weights:
        msg += field_varint(9, 1)
    return b"\x00" + msg


def step(x, session="0123456789abcdef0123456789abcdef"):
    """mqa.v1.StepRequest{step: StepInput} (selector byte 1)."""
    step_input = field_bytes(1, session.encode()) + field_bytes(3, x) + field_varint(4, 0) + field_varint(5, 7)
    return b"\x01" + field_bytes(1, step_input)


def wire_seeds():
    dim, d = 8, 4  # the fuzzer's model: dim 8, 2 heads, head_dim 4
    return {
        "forward_x": forward(tensor(F32, [1, 2, dim], floats(2 * dim))),
        "forward_cache": forward(tensor(F32, [1, 1, dim], floats(dim)),
                                 kv=(tensor(F32, [1, 1, d, 2], floats(2 * d)),
                                     tensor(F32, [1, 1, 2, d], floats(2 * d))),
                                 return_cache=True),
        "forward_start_cache": forward(tensor(F16, [2, 3, dim], floats(6 * dim, F16)), return_cache=True),
        "forward_bias_mask": forward(tensor(F32, [1, 2, dim], floats(2 * dim)),
                                     bias=tensor(F32, [1, 1, 2, 2], floats(4)),
                                     mask=tensor(U8, [1, 2], b"\x01\x00"), causal=False, needs_weights=True),
        "forward_bool_mask": forward(tensor(BF16, [1, 3, dim], floats(3 * dim, BF16)), layer=0,
                                     mask=tensor(BOOL, [1, 3], b"\x01\x01\x00")),
        "forward_bad_layer": forward(tensor(F32, [1, 1, dim], floats(dim)), layer=3),
        "step_decode": step(tensor(F32, [1, 1, dim], floats(dim))),
        "tensor_empty_dims": b"\x02" + tensor(BOOL, [0, 3], b""),
        "tensor_scalar": b"\x02" + tensor(U8, [], b"\x07"),
        "tensor_no_dtype": b"\x02" + tensor(0, [2], b"\x00\x00"),
        "tensor_short": b"\x02" + tensor(F32, [2, 2], floats(3)),
    }


def safetensors(entries, metadata=None, pad=True):
    """entries: name -> (dtype string, shape, bytes); laid out in order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    layer = {
        "layers.0.attn.Wqkv.weight": ("F32", [4, 2], floats(8)),
        "layers.0.attn.Wqkv.bias": ("BF16", [4], floats(4, BF16)),
        "layers.0.attn.out_proj.weight": ("F16", [2, 2], floats(4, F16)),
    }
    return {
        "layer": safetensors(layer, {"format": "pt"}),
        "all_dtypes": safetensors({"a": ("BOOL", [3], b"\x01\x00\x01"), "b": ("U8", [2, 1], b"\x07\x08"),
                                   "c": ("F32", [], floats(1)), "d": ("F16", [0, 5], b"")}),
        "empty_header": safetensors({}),
        "metadata_only": safetensors({}, {"k": "v", "empty": ""}),
        "unpadded": safetensors({"x": ("F32", [1], floats(1))}, pad=False),
        "bad_dtype": safetensors({"x": ("I64", [1], b"\x00" * 8)}),
        "truncated": safetensors(layer)[:-5],
    }


EXAMPLE = """\
listen: "127.0.0.1:0"
max_message_bytes: 1048576
metrics_listen: ""
drain_timeout_ms: 1000
log_level: warn
log_format: json
max_sessions: 8
max_queue: 16
default_idle_ttl_ms: 1000
max_idle_ttl_ms: 60000
max_batch_tokens: 64
max_batch_sessions: 4
max_queue_delay_us: 100
max_prefill_chunk: 16
kv_block_size: 4
kv_cache_bytes: 0
kv_gpu_memory_fraction: 0.5
kv_cpu_budget_bytes: 1048576
models:
  - name: small
    num_layers: 2
    dim: 64
    heads: 4
    attn_impl: torch
    clip_qkv: 8.0
    qk_ln: true
    softmax_scale: null
    attn_pdrop: 0.0
    norm_type: rmsnorm
    fc_type: torch
    device: cpu
    dtype: fp32
    seed: 3
    weights: w.safetensors
    max_tokens_per_session: 128
    description: "a small model"
  - name: other
    devices: [cpu]
    dim: 16
    heads: 2
"""


def config_seeds():
    flow = json.dumps({"listen": "[::1]:50051", "health_listen": "unix:/tmp/mqa.sock",
                       "models": [{"name": "j", "dim": 32, "heads": 8, "dtype": "bfloat16",
                                   "norm_type": "layernornm", "clip_qkv": None}]})
    return {
        "example.yaml": EXAMPLE.encode(),
        "flow.json": flow.encode(),
        "empty_models.yaml": b"models: []\nlog_level: info\n",
        "bad_key.yaml": b"models:\n  - name: a\n    hedas: 4\n",
        "quoted_number.yaml": b"max_sessions: \"12\"\n",
        # File, then environment lines, then flags (NUL-separated; see config_fuzz.cc).
        "env_and_flags": b"max_queue: 5\n\0MQA_MAX_SESSIONS=3\nMQA_LOG_FORMAT=text\nMQA_DEVICES=cpu\n"
                         b"\0--max-queue=7\n--log-level\ndebug\n--kv-block-size=8\n",
        "flags_only": b"\0\0--device\ncpu\n--listen=unix:/tmp/x\n--max-idle-ttl-ms=5\n--default-idle-ttl-ms=6\n",
        "devices_all": b"models:\n  - name: a\n    devices: all\n\0\0--devices=cpu\n",
        "help": b"\0\0--nope\n--help\n",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus"))
    args = parser.parse_args()
    for target, seeds in (("wire", wire_seeds()), ("safetensors", safetensors_seeds()),
                          ("config", config_seeds())):
        folder = os.path.join(args.out, target)
        os.makedirs(folder, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(folder, name), "wb") as fh:
                fh.write(data)
        print(f"{folder}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
