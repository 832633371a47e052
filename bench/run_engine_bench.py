#!/usr/bin/env python3
"""Batched vs unbatched decode, in one run: the in-process engine (mqa-bench-engine, both modes) and the service
(mqa-server started twice on 127.0.0.1: batched with its defaults, unbatched with --max-batch-sessions 1; each
driven by `mqa-cli bench`). Prints one table per part with a speedup column (batched tokens/s over unbatched
tokens/s at the same number of sessions) and writes everything to DIR/engine-bench.json and DIR/engine-bench.txt.

A server that refuses a batching flag (a build from before those flags existed) is reported as such, and the run
goes on without that service mode.

Usage: run_engine_bench.py --preset cpu|gpu [--build build/release] [--out bench/results] [--sessions 1,8,64]
         [--prefill P] [--tokens T] [--warmup W] [--streams S] [--max-batch-sessions B] [--max-batch-tokens K]
         [--skip-engine] [--skip-service]

Standard library only."""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    "gpu": {"device": "cuda", "dtype": "bfloat16", "dim": 4096, "heads": 32, "layers": 4, "attn_impl": "flash",
            "sessions": "1,8,64,256", "prefill": 128, "tokens": 32, "warmup": 4},
    # Sized for a 2-core CPU machine: the whole run (engine and service, both modes) takes about a minute.
    # One intra-op thread: with LibTorch's default (one per core), its spinning threads compete with the engine
    # worker, the gRPC threads and the client on 2 cores, and single steps then take 20+ ms at random.
    "cpu": {"device": "cpu", "dtype": "float32", "dim": 512, "heads": 8, "layers": 2, "attn_impl": "torch",
            "sessions": "1,8,64", "prefill": 32, "tokens": 16, "warmup": 2, "omp_threads": 1},
}
MODES = ("batched", "unbatched")
MODEL = "bench"


def log(msg=""):
    print(msg, flush=True)


def run_logged(cmd, log_path, timeout):
    """Runs cmd, echoing its stdout and stderr live and saving them to log_path. Returns the exit code."""
    log("$ " + " ".join(cmd))
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write(line)
            if time.monotonic() > deadline:
                proc.kill()
                log(f"(killed after {timeout} s)")
                break
        return proc.wait()


def card_name(device):
    """The device's name, for when mqa-bench-engine (which names it itself) did not run."""
    if device.startswith("cuda"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
            return out[0] if out else "unknown GPU"
        except (OSError, subprocess.SubprocessError):
            return "unknown GPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_engine(args, cfg, out_dir):
    json_path = os.path.join(out_dir, "engine.json")
    cmd = [os.path.join(args.build, "bench", "mqa-bench-engine"), "--device", cfg["device"], "--dtype", cfg["dtype"],
           "--dim", str(cfg["dim"]), "--heads", str(cfg["heads"]), "--layers", str(cfg["layers"]),
           "--attn-impl", cfg["attn_impl"], "--sessions", cfg["sessions"], "--prefill", str(cfg["prefill"]),
           "--tokens", str(cfg["tokens"]), "--warmup", str(cfg["warmup"]), "--modes", ",".join(MODES),
           "--json", json_path]
    if args.max_batch_sessions:
        cmd += ["--max-batch-sessions", str(args.max_batch_sessions)]
    if args.max_batch_tokens:
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    rc = run_logged(cmd, os.path.join(out_dir, "engine.log"), args.timeout)
    if rc != 0:
        return {"status": "failed", "exit_code": rc, "log": os.path.join(out_dir, "engine.log")}
    with open(json_path) as fh:
        return {"status": "ok", "result": json.load(fh)}


def server_config(cfg, max_sessions):
    device = "cuda:0" if cfg["device"] == "cuda" else cfg["device"]
    return {
        "log_level": "warn",
        "max_sessions": max(1024, max_sessions),
        "max_queue": max(4096, 4 * max_sessions),
        "models": [{
            "name": MODEL, "description": "run_engine_bench.py", "num_layers": cfg["layers"], "dim": cfg["dim"],
            "heads": cfg["heads"], "attn_impl": cfg["attn_impl"], "device": device, "dtype": cfg["dtype"], "seed": 0,
            "max_tokens_per_session": cfg["prefill"] + cfg["warmup"] + cfg["tokens"],
        }],
    }


def stop_server(proc, grace=60):
    """SIGTERM (a graceful drain), then SIGKILL after `grace` seconds. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def run_service(args, cfg, out_dir, mode, config_path):
    """One server start in `mode` and one `mqa-cli bench` against it."""
    mode_flags = ["--max-batch-sessions", "1"] if mode == "unbatched" else []
    if mode == "batched" and args.max_batch_sessions:
        mode_flags += ["--max-batch-sessions", str(args.max_batch_sessions)]
    if mode == "batched" and args.max_batch_tokens:
        mode_flags += ["--max-batch-tokens", str(args.max_batch_tokens)]
    port_file = os.path.join(out_dir, f"server-{mode}.port")
    server_log = os.path.join(out_dir, f"server-{mode}.log")
    if os.path.exists(port_file):
        os.remove(port_file)
    server_cmd = [os.path.join(args.build, "server", "mqa-server"), "--config", config_path,
                  "--listen", "127.0.0.1:0", "--port-file", port_file] + mode_flags
    entry = {"mode": mode, "server_flags": mode_flags, "server_command": server_cmd}
    log(f"\n== service, {mode}: $ {' '.join(server_cmd)}")
    with open(server_log, "w") as slog:
        proc = subprocess.Popen(server_cmd, stdout=slog, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.server_start_timeout
    while not (os.path.exists(port_file) and os.path.getsize(port_file) > 0):
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if proc.poll() is not None or not os.path.exists(port_file):
        code = stop_server(proc, grace=5)
        with open(server_log) as fh:
            text = fh.read().strip()
        refused = [f for f in mode_flags if f.startswith("--") and f in text]
        if code == 2 and refused:
            entry.update(status="server_refused_flag", exit_code=code, message=text)
            log(f"NOTE: mqa-server refused {' '.join(mode_flags)} (exit {code}): {text.splitlines()[0]}")
            log(f"      This server build has no such flag yet, so the {mode} service run is skipped.")
        else:
            entry.update(status="server_failed", exit_code=code, message=text[-2000:])
            log(f"ERROR: mqa-server did not start (exit {code}); see {server_log}:\n{text[-2000:]}")
        return entry
    with open(port_file) as fh:
        port = fh.read().strip()
    json_path = os.path.join(out_dir, f"service-{mode}.json")
    cli_cmd = [os.path.join(args.build, "client", "mqa-cli"), "--target", f"127.0.0.1:{port}", "--model", MODEL,
               "--timeout-ms", "120000", "bench", "--sessions", cfg["sessions"], "--prefill", str(cfg["prefill"]),
               "--tokens", str(cfg["tokens"]), "--warmup", str(cfg["warmup"]), "--streams", str(args.streams),
               "--json", json_path]
    try:
        rc = run_logged(cli_cmd, os.path.join(out_dir, f"service-{mode}.log"), args.timeout)
    finally:
        server_exit = stop_server(proc)
    entry.update(client_exit=rc, server_exit=server_exit)
    log(f"server exit: {server_exit}")
    if rc != 0:
        entry["status"] = "client_failed"
        return entry
    with open(json_path) as fh:
        entry.update(status="ok", result=json.load(fh))
    return entry


def speedup(batched, unbatched):
    if batched is None or unbatched is None or not unbatched:
        return None
    return batched / unbatched


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def tables(report):
    lines = []
    cfg = report["config"]
    eng = report.get("engine")
    lines.append(f"card: {report['card']} ({cfg['device']}); {cfg['dtype']}, dim {cfg['dim']}, heads {cfg['heads']}, "
                 f"layers {cfg['layers']}, attn_impl {cfg['attn_impl']}, OMP_NUM_THREADS {cfg['omp_threads'] or '-'}; "
                 f"per session prefill {cfg['prefill']}, "
                 f"warm-up {cfg['warmup']}, decode {cfg['tokens']} tokens; unbatched = max_batch_sessions 1")
    if eng and eng["status"] == "ok":
        rows = eng["result"]["rows"]
        lines.append("")
        lines.append("== engine (in process, mqa-bench-engine): batched vs unbatched, same run")
        lines.append(f"{'mode':9} {'N':>5} {'tokens/s':>12} {'p50_ms':>9} {'p99_ms':>9} {'batch':>6} "
                     f"{'prefill_s':>10} {'speedup':>8}")
        for r in sorted(rows, key=lambda r: (r["sessions"], r["mode"])):
            lines.append(f"{r['mode']:9} {r['sessions']:>5} {r['tokens_per_s']:>12.1f} {r['step_p50_ms']:>9.3f} "
                         f"{r['step_p99_ms']:>9.3f} {fmt(r['mean_batch_size'], '.1f'):>6} {r['prefill_s']:>10.3f} "
                         f"{fmt(r['speedup_vs_unbatched'], '.2f') + ('x' if r['speedup_vs_unbatched'] else ''):>8}")
    elif eng:
        lines.append(f"\n== engine: {eng['status']} (exit {eng.get('exit_code')}; {eng.get('log')})")
    svc = report.get("service")
    if svc:
        lines.append("")
        lines.append(f"== service (mqa-server over loopback, mqa-cli bench, {report['config']['streams']} streams): "
                     "batched vs unbatched")
        by_mode = {}
        for mode in MODES:
            e = svc.get(mode)
            if e is None:
                continue
            if e["status"] != "ok":
                lines.append(f"  {mode}: {e['status']}" + (f" ({e['message'].splitlines()[0]})" if e.get("message")
                                                           else ""))
                continue
            by_mode[mode] = {r["sessions"]: r for r in e["result"]["rows"]}
        ns = sorted({n for rows in by_mode.values() for n in rows})
        lines.append(f"{'N':>5} {'batched tok/s':>14} {'p50_ms':>9} {'p99_ms':>9} {'unbatched tok/s':>16} "
                     f"{'p50_ms':>9} {'p99_ms':>9} {'speedup':>8}")
        for n in ns:
            b = by_mode.get("batched", {}).get(n)
            u = by_mode.get("unbatched", {}).get(n)
            s = speedup(b and b["tokens_per_s"], u and u["tokens_per_s"])
            lines.append(f"{n:>5} {fmt(b and b['tokens_per_s'], '.1f'):>14} {fmt(b and b['step_p50_ms'], '.3f'):>9} "
                         f"{fmt(b and b['step_p99_ms'], '.3f'):>9} {fmt(u and u['tokens_per_s'], '.1f'):>16} "
                         f"{fmt(u and u['step_p50_ms'], '.3f'):>9} {fmt(u and u['step_p99_ms'], '.3f'):>9} "
                         f"{(fmt(s, '.2f') + 'x') if s else '-':>8}")
    lines.append("")
    lines.append("tokens/s: decode tokens through every layer per wall second (N sessions x T tokens / decode time); "
                 "p50/p99: one layer step, submit to answer; batch: mean steps per engine pass ('-': not counted by "
                 "this engine); speedup: batched / unbatched tokens/s at the same N")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--build", default=os.path.join(HERE, "..", "build", "release"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--sessions", help="comma list of session counts (overrides the preset)")
    ap.add_argument("--prefill", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--attn-impl", choices=["torch", "flash", "triton"], help="overrides the preset's attn_impl")
    ap.add_argument("--streams", type=int, default=4, help="StepStreams the service bench multiplexes sessions on")
    ap.add_argument("--max-batch-sessions", type=int, help="batched mode only (default: the engine's/server's own)")
    ap.add_argument("--max-batch-tokens", type=int, help="batched mode only (default: the engine's/server's own)")
    ap.add_argument("--omp-threads", type=int,
                    help="OMP_NUM_THREADS for the engine bench and the servers (cpu preset: 1; 0: leave unset)")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark program")
    ap.add_argument("--server-start-timeout", type=int, default=300)
    args = ap.parse_args()

    cfg = dict(PRESETS[args.preset])
    for key in ("sessions", "prefill", "tokens", "warmup", "omp_threads", "attn_impl"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["streams"] = args.streams
    if cfg.get("omp_threads"):
        os.environ["OMP_NUM_THREADS"] = str(cfg["omp_threads"])  # inherited by every program started below
    else:
        cfg["omp_threads"] = os.environ.get("OMP_NUM_THREADS")
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    report = {"bench": "engine-batched-vs-unbatched", "host": platform.node(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "preset": args.preset, "config": cfg,
              "max_batch_sessions": args.max_batch_sessions, "max_batch_tokens": args.max_batch_tokens}

    if not args.skip_engine:
        log("== engine (in process)")
        report["engine"] = run_engine(args, cfg, args.out)
    if report.get("engine", {}).get("status") == "ok":
        report["card"] = report["engine"]["result"]["card"]
    else:
        report["card"] = card_name(cfg["device"])

    if not args.skip_service:
        max_n = max(int(n) for n in str(cfg["sessions"]).split(",") if n)
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="bench-server-", dir=args.out,
                                         delete=False) as fh:
            json.dump(server_config(cfg, max_n), fh, indent=1)
            config_path = fh.name
        report["service"] = {"server_config": server_config(cfg, max_n),
                             "note": "server and client on the same host as the engine bench (card above)"}
        for mode in MODES:
            report["service"][mode] = run_service(args, cfg, args.out, mode, config_path)
        os.remove(config_path)

    report["wall_s"] = round(time.monotonic() - started, 1)
    text = tables(report)
    log("\n" + text)
    json_path = os.path.join(args.out, "engine-bench.json")
    with open(json_path, "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(args.out, "engine-bench.txt"), "w") as fh:
        fh.write(text + "\n")
    log(f"\nwrote {json_path} and engine-bench.txt ({report['wall_s']} s)")
    failed = [k for k in ("engine",) if report.get(k, {}).get("status") not in (None, "ok")]
    failed += [m for m in MODES if report.get("service", {}).get(m, {}).get("status")
               not in (None, "ok", "server_refused_flag")]
    if failed:
        log("FAILED: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
