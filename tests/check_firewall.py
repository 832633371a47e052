#!/usr/bin/env python3
"""The include firewall (docs/development.md; docs/gpu.md, "The two LibTorch rules", rule 2).

LibTorch ships its own protobuf and fmt headers, which shadow the system ones. So:
  1. torch/ATen/c10/caffe2 headers may be included only by core's private sources (core/src/), and by the
     kernel tests and benchmarks of core (tests/kernels/, bench/kernels/), which compare against LibTorch;
  2. no file under core/ (or those two folders) may include protobuf, gRPC, spdlog or fmt headers;
  3. core's public headers (core/include/) include only the C++ standard library and other public core headers;
  4. the client library's public headers (client/include/) include only the C++ standard library and other
     public client headers (no protobuf or gRPC types reach the users of mqa::client).

Usage: check_firewall.py [--root DIR]     exit 1 and list violations if any
       check_firewall.py --self-test       proves the check fails when the firewall is broken
"""
import argparse
import os
import re
import shutil
import sys
import tempfile

SOURCE_EXT = (".h", ".hh", ".hpp", ".cc", ".cpp", ".cxx", ".cu", ".cuh", ".inc")
SKIP_DIRS = {".git", ".venv", ".device-debs", ".whl", "__pycache__", "node_modules"}
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
TORCH = re.compile(r"^(torch|ATen|c10|caffe2)/")
TORCH_ALLOWED = ("core/src/", "tests/kernels/", "bench/kernels/")
BANNED_IN_CORE = re.compile(r"^(google/protobuf|grpcpp|grpc|grpc\+\+|spdlog|fmt)/")
STD_HEADERS = set(
    "algorithm any array atomic bitset cassert cctype cerrno cfloat charconv chrono cinttypes climits cmath "
    "complex condition_variable cstddef cstdint cstdio cstdlib cstring ctime deque exception filesystem "
    "functional future initializer_list iomanip ios iosfwd iostream istream iterator limits list map memory "
    "mutex new numeric optional ostream queue random ratio set shared_mutex span sstream stack stdexcept "
    "string string_view system_error thread tuple type_traits typeinfo unordered_map unordered_set utility "
    "variant vector".split())


def source_files(root):
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not (rel == "." and d.startswith("build"))]
        for f in filenames:
            if f.endswith(SOURCE_EXT):
                yield os.path.join(dirpath, f)


def violations(root):
    found = []
    for path in source_files(root):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        for kind, header in INCLUDE.findall(text):
            if TORCH.match(header) and not rel.startswith(TORCH_ALLOWED):
                found.append(f"{rel}: includes <{header}>: LibTorch may only be included by core/src/ "
                             "(and the kernel tests and benchmarks)")
            if rel.startswith(("core/",) + TORCH_ALLOWED) and BANNED_IN_CORE.match(header):
                found.append(f"{rel}: includes <{header}>: core must not include protobuf/gRPC/spdlog/fmt")
            if rel.startswith("core/include/"):
                if kind == "<" and header not in STD_HEADERS:
                    found.append(f"{rel}: includes <{header}>: public core headers use only the C++ standard library")
                if kind == '"' and not header.startswith("mqa/core/"):
                    found.append(f'{rel}: includes "{header}": public core headers may include only mqa/core/...')
            if rel.startswith("client/include/"):
                if kind == "<" and header not in STD_HEADERS:
                    found.append(f"{rel}: includes <{header}>: public client headers use only the C++ standard library")
                if kind == '"' and not header.startswith("mqa/client/"):
                    found.append(f'{rel}: includes "{header}": public client headers may include only mqa/client/...')
    return found


def self_test(root):
    """Break the firewall in a copy of the real tree in four ways; each must be caught."""
    breaks = [
        ("server/firewall_probe.cc", "#include <torch/torch.h>\n"),
        ("client/include/mqa/client/firewall_probe.h", "#include <grpcpp/grpcpp.h>\n"),
        ("core/src/firewall_probe.cc", "#include <grpcpp/grpcpp.h>\n"),
        ("core/include/mqa/core/firewall_probe.h", "#include <ATen/ATen.h>\n"),
    ]
    assert not violations(root), "the real tree must be clean before the self-test means anything"
    for rel, line in breaks:
        with tempfile.TemporaryDirectory() as tmp:
            for top in ("core", "server", "client", "proto", "tests", "bench"):
                if os.path.isdir(os.path.join(root, top)):
                    shutil.copytree(os.path.join(root, top), os.path.join(tmp, top))
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "w") as fh:
                fh.write(line)
            v = violations(tmp)
            if not any(rel in x for x in v):
                print(f"self-test FAILED: '{line.strip()}' in {rel} was not caught")
                return 1
            print(f"self-test: caught {v[0]}")
    print("self-test passed: every break of the firewall was caught")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        return self_test(args.root)
    v = violations(args.root)
    for line in v:
        print(line)
    print(f"include firewall: {len(v)} violation(s) in {sum(1 for _ in source_files(args.root))} files")
    return 1 if v else 0


if __name__ == "__main__":
    sys.exit(main())
