#!/usr/bin/env python3
"""Installs the "client" component into a scratch prefix, builds tests/outside_project against it with
find_package(mqa_client), and runs the result.

With --server (the mqa-server binary): starts it on 127.0.0.1 with port 0 and --port-file, waits for the
port, runs the consumer against it (expects "health: SERVING" and a model count), and always stops the
server (SIGTERM, then SIGKILL after a grace period). Without: runs the consumer against a loopback port
nobody listens on and expects "error: UNAVAILABLE", which still proves the installed library loads and
makes gRPC calls.
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def run(cmd, **kw):
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def free_port():
    # Bound and released at once: nothing listens there afterwards (a race with another process taking it
    # is possible but harmless: the check would then fail loudly, not pass wrongly).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_and_build(args):
    prefix = os.path.join(args.work, "prefix")
    build = os.path.join(args.work, "build")
    for d in (prefix, build):
        shutil.rmtree(d, ignore_errors=True)
    run([args.cmake, "--install", args.build_dir, "--prefix", prefix, "--component", "client"]
        + (["--config", args.build_type] if args.build_type else []))
    if not os.path.exists(os.path.join(prefix, "include/mqa/client/client.h")):
        sys.exit("install is missing include/mqa/client/client.h")
    if not any("mqa_clientConfig.cmake" in files for _, _, files in os.walk(prefix)):
        sys.exit("install is missing mqa_clientConfig.cmake")
    # The installed headers must be usable without gRPC or protobuf on the include path.
    for root, _, files in os.walk(os.path.join(prefix, "include")):
        for f in files:
            text = open(os.path.join(root, f), encoding="utf-8").read()
            for banned in ("grpc", "google/protobuf"):
                if f"#include <{banned}" in text or f'#include "{banned}' in text:
                    sys.exit(f"installed header {f} includes {banned}")
    configure = [args.cmake, "-S", args.source, "-B", build, f"-DCMAKE_PREFIX_PATH={prefix}"]
    if args.generator:
        configure += ["-G", args.generator]
    if args.build_type:
        configure.append(f"-DCMAKE_BUILD_TYPE={args.build_type}")
    run(configure)
    run([args.cmake, "--build", build] + (["--config", args.build_type] if args.build_type else []))
    for candidate in (os.path.join(build, "mqa_client_consumer"),
                      os.path.join(build, args.build_type or "", "mqa_client_consumer")):
        if os.path.exists(candidate):
            return candidate
    sys.exit("the consumer binary was not built")


def run_consumer(binary, target):
    print(f"+ {binary} {target}", flush=True)
    p = subprocess.run([binary, target], capture_output=True, text=True, timeout=120)
    sys.stdout.write(p.stdout)
    sys.stdout.write(p.stderr)
    return p


def with_server(args, binary):
    port_file = os.path.join(args.work, "server.port")
    if os.path.exists(port_file):
        os.remove(port_file)
    log = open(os.path.join(args.work, "server.log"), "w")
    server = subprocess.Popen([args.server, "--listen", "127.0.0.1:0", "--port-file", port_file],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + args.server_start_timeout
        port = None
        while time.monotonic() < deadline:
            if server.poll() is not None:
                break
            if os.path.exists(port_file):
                text = open(port_file).read().strip()
                if text.isdigit():
                    port = int(text)
                    break
            time.sleep(0.1)
        if port is None:
            log.flush()
            print(open(os.path.join(args.work, "server.log")).read())
            sys.exit("mqa-server did not write its port file in time"
                     if server.poll() is None else f"mqa-server exited with {server.returncode}")
        p = run_consumer(binary, f"127.0.0.1:{port}")
        if p.returncode != 0 or "health: SERVING" not in p.stdout or "models: " not in p.stdout:
            sys.exit("the consumer failed against the live server")
        print("outside project: OK against a live mqa-server")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--cmake", default="cmake")
    ap.add_argument("--generator", default="")
    ap.add_argument("--build-type", default="")
    ap.add_argument("--server", default="")
    ap.add_argument("--server-start-timeout", type=float, default=60.0)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.server and not os.access(args.server, os.X_OK):
        sys.exit(f"{args.server} is not built: build the mqa-server target (or the whole tree) first")
    binary = install_and_build(args)
    if args.server:
        with_server(args, binary)
        return 0
    p = run_consumer(binary, f"127.0.0.1:{free_port()}")
    if p.returncode != 1 or "error: UNAVAILABLE" not in p.stderr:
        sys.exit("expected the consumer to report UNAVAILABLE for a port nobody listens on")
    print("outside project: OK (installed, built, ran; no mqa-server target, so no live check)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
