#!/usr/bin/env python3
"""Offline checks of the deployment files (CTest deploy_checks; --self-test: deploy_checks_selftest).

There is no Docker engine and no cluster in CI, so the files are linted and validated, not run:

  Dockerfile   hadolint; every finding fails (justified exceptions are inline `# hadolint ignore=` comments)
  deploy/k8s   yamllint (deploy/k8s/.yamllint); kubernetes-validate --strict against a fixed Kubernetes version
               (schemas carried by the PyPI package, no network) for every manifest; kustomization.yaml lists
               exactly the manifests next to it; and the cross-file facts nothing else checks: the grace period
               covers preStop + the drain budget, the startup probe allows 10 minutes of model loading, the
               liveness window outlasts a drain, probes/ports/annotations agree with the MQA_* listen addresses,
               selectors match, the HPA targets the Deployment, the model config uses only the server's keys, and
               the Envoy config hashes on x-mqa-session-key over a RING_HASH cluster on the headless Service.

--self-test copies the files, checks that the copy passes, then breaks it in several ways (a wrong field type in
the Deployment, an unknown HPA field, a Dockerfile lint finding, a YAML lint finding, a short grace period, an
unknown config key) and expects each to fail.

Usage: check_deploy.py [--root DIR] [--tools-dir DIR] [--kubernetes-version 1.30.0] [--self-test]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DEFAULT_K8S_VERSION = "1.30.0"
MIN_STARTUP_SECONDS = 600   # model loading may take 10 minutes
GRACE_MARGIN_SECONDS = 5    # at least this much between the end of the drain budget and SIGKILL
SESSION_HEADER = "x-mqa-session-key"


def find_tool(name, tools_dir):
    if tools_dir:
        candidate = Path(tools_dir) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    here = Path(sys.executable).parent / name   # the venv's bin dir when run with .venv/bin/python
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def run_tool(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc.returncode, proc.stdout.strip()


def load_one(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    if len(docs) != 1:
        raise ValueError(f"{path}: expected one resource, found {len(docs)}")
    return docs[0]


def port_of(address):
    return int(address.rsplit(":", 1)[1])


class Checker:
    def __init__(self, root, tools_dir, k8s_version):
        self.root = Path(root)
        self.k8s_dir = self.root / "deploy" / "k8s"
        self.tools_dir = tools_dir
        self.k8s_version = k8s_version
        self.failures = []

    def fail(self, what):
        self.failures.append(what)

    def require(self, cond, what):
        if not cond:
            self.fail(what)
        return cond

    # --- tools -----------------------------------------------------------------------------------------------
    def tool(self, name):
        path = find_tool(name, self.tools_dir)
        if path is None:
            self.fail(f"{name} not found (scripts/setup.sh installs it into .venv)")
        return path

    def hadolint(self):
        exe = self.tool("hadolint")
        if exe is None:
            return
        rc, out = run_tool([exe, "--no-color", "Dockerfile"], self.root)
        self.require(rc == 0, f"hadolint Dockerfile (rc {rc}):\n{out}")

    def yamllint(self):
        exe = self.tool("yamllint")
        if exe is None:
            return
        rc, out = run_tool([exe, "-f", "parsable", "-c", str(self.k8s_dir / ".yamllint"), str(self.k8s_dir)],
                           self.root)
        self.require(rc == 0, f"yamllint deploy/k8s (rc {rc}):\n{out}")

    def manifests(self):
        return sorted(p for p in self.k8s_dir.rglob("*.yaml") if p.name != "kustomization.yaml")

    def kubernetes_validate(self):
        exe = self.tool("kubernetes-validate")
        if exe is None:
            return
        files = [str(p.relative_to(self.root)) for p in self.manifests()]
        rc, out = run_tool([exe, "--kubernetes-version", self.k8s_version, "--strict", "--quiet", *files], self.root)
        # A manifest whose kind has no schema is only a warning to the tool: make it an error here.
        self.require(rc == 0 and "Couldn't find schema" not in out,
                     f"kubernetes-validate --strict (rc {rc}): {out}")

    # --- cross-file facts ------------------------------------------------------------------------------------
    def semantics(self):
        k = self.k8s_dir
        try:
            kust = load_one(k / "kustomization.yaml")
            env_cm = load_one(k / "configmap-env.yaml")
            model_cm = load_one(k / "configmap-model.yaml")
            dep = load_one(k / "deployment.yaml")
            svc = load_one(k / "service.yaml")
            headless = load_one(k / "service-headless.yaml")
            pdb = load_one(k / "pdb.yaml")
            hpa = load_one(k / "hpa.yaml")
            envoy_cm = load_one(k / "envoy-configmap.yaml")
            example = yaml.safe_load((self.root / "deploy" / "config" / "example.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError) as e:
            self.fail(f"reading the manifests: {e}")
            return

        listed = set(kust.get("resources", []))
        top = {p.name for p in k.glob("*.yaml") if p.name != "kustomization.yaml"}
        self.require(listed == top, f"kustomization.yaml resources {sorted(listed)} != the manifests in "
                                    f"deploy/k8s {sorted(top)}")
        namespace = kust.get("namespace")

        env = env_cm.get("data", {})
        drain_ms = int(env.get("MQA_DRAIN_TIMEOUT_MS", "30000"))
        grpc_port = port_of(env.get("MQA_LISTEN", "0.0.0.0:50051"))
        health_port = port_of(env.get("MQA_HEALTH_LISTEN", ":0"))
        metrics_port = port_of(env.get("MQA_METRICS_LISTEN", "0.0.0.0:9400"))

        pod = dep["spec"]["template"]
        spec = pod["spec"]
        labels = pod["metadata"].get("labels", {})
        (c,) = [c for c in spec["containers"] if c["name"] == "mqa-server"]

        # Termination: preStop sleep + drain budget + margin <= grace period.
        grace = spec.get("terminationGracePeriodSeconds", 30)
        pre = c.get("lifecycle", {}).get("preStop", {})
        if "exec" in pre:
            cmd = pre["exec"]["command"]
            prestop = int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else 0
        else:
            prestop = int(pre.get("sleep", {}).get("seconds", 0))
        self.require(prestop > 0, "deployment: preStop should sleep a few seconds so endpoints update first")
        need = prestop + drain_ms / 1000 + GRACE_MARGIN_SECONDS
        self.require(grace >= need, f"deployment: terminationGracePeriodSeconds {grace} < preStop {prestop} s + "
                                    f"MQA_DRAIN_TIMEOUT_MS {drain_ms / 1000:g} s + {GRACE_MARGIN_SECONDS} s margin")

        # Probes: gRPC on the health port; startup window for model loading; liveness outlasts a drain.
        probes = {n: c.get(n) for n in ("startupProbe", "readinessProbe", "livenessProbe")}
        for name, p in probes.items():
            if not self.require(p is not None and "grpc" in p, f"deployment: {name} should be a gRPC probe"):
                continue
            self.require(p["grpc"].get("port") == health_port,
                         f"deployment: {name} port {p['grpc'].get('port')} != MQA_HEALTH_LISTEN's {health_port}")

        def window(p):
            return p.get("periodSeconds", 10) * p.get("failureThreshold", 3)
        if probes["startupProbe"]:
            self.require(window(probes["startupProbe"]) >= MIN_STARTUP_SECONDS,
                         f"deployment: startupProbe allows {window(probes['startupProbe'])} s < "
                         f"{MIN_STARTUP_SECONDS} s for model loading")
        if probes["livenessProbe"]:
            self.require(window(probes["livenessProbe"]) >= prestop + drain_ms / 1000,
                         f"deployment: livenessProbe window {window(probes['livenessProbe'])} s would restart a "
                         f"draining server (preStop + drain = {prestop + drain_ms / 1000:g} s)")

        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        self.require(ports == {"grpc": grpc_port, "health": health_port, "metrics": metrics_port},
                     f"deployment: container ports {ports} do not match the MQA_*_LISTEN ports")
        ann = pod["metadata"].get("annotations", {})
        self.require(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(metrics_port),
                     f"deployment: prometheus annotations {ann} do not point at the metrics port {metrics_port}")
        limits = c.get("resources", {}).get("limits", {})
        self.require(str(limits.get("nvidia.com/gpu")) == "1", "deployment: limits should ask for nvidia.com/gpu: 1")
        sc = spec.get("securityContext", {})
        self.require(sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0,
                     "deployment: the pod should run as a non-root user")

        # The config file is mounted and passed.
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        cfg_vol = [n for n, v in vols.items() if v.get("configMap", {}).get("name") == model_cm["metadata"]["name"]]
        self.require(len(cfg_vol) == 1 and cfg_vol[0] in mounts, "deployment: the model ConfigMap is not mounted")
        if cfg_vol and cfg_vol[0] in mounts:
            (key,) = model_cm["data"].keys()
            path = f"{mounts[cfg_vol[0]]}/{key}"
            args = c.get("args", [])
            self.require(path in args or env.get("MQA_CONFIG") == path,
                         f"deployment: {path} is passed neither with --config nor MQA_CONFIG")

        # The model config only uses keys the server knows (deploy/config/example.yaml shows every key; dtype
        # and weights are commented out there).
        (cfg_text,) = model_cm["data"].values()
        cfg = yaml.safe_load(cfg_text)
        known = set(example) | {"metrics_listen", "health_listen"}
        self.require(not set(cfg) - known, f"configmap-model: unknown keys {sorted(set(cfg) - known)}")
        model_known = set().union(*(m.keys() for m in example["models"])) | {"dtype", "weights"}
        for m in cfg.get("models", []):
            self.require(not set(m) - model_known, f"configmap-model: model {m.get('name')}: unknown keys "
                                                   f"{sorted(set(m) - model_known)}")

        # Selectors.
        def selects(selector):
            return bool(selector) and all(labels.get(k2) == v for k2, v in selector.items())
        self.require(selects(dep["spec"]["selector"]["matchLabels"]), "deployment: selector misses its pods")
        self.require(selects(svc["spec"]["selector"]), "service: selector misses the mqa-server pods")
        self.require(selects(headless["spec"]["selector"]), "service-headless: selector misses the pods")
        self.require(headless["spec"].get("clusterIP") == "None", "service-headless: clusterIP should be None")
        self.require(selects(pdb["spec"]["selector"]["matchLabels"]), "pdb: selector misses the mqa-server pods")

        # HPA.
        ref = hpa["spec"]["scaleTargetRef"]
        self.require(ref.get("kind") == "Deployment" and ref.get("name") == dep["metadata"]["name"],
                     f"hpa: scaleTargetRef {ref} is not the mqa-server Deployment")
        names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        self.require(names == {"mqa_queued_requests", "mqa_kv_cache_usage_ratio"},
                     f"hpa: Pods metrics {sorted(names)}")

        # Envoy: hash on the session header, RING_HASH over the headless Service's DNS name.
        envoy = yaml.safe_load(envoy_cm["data"]["envoy.yaml"])
        routes = [r for lst in envoy["static_resources"]["listeners"] for fc in lst["filter_chains"]
                  for f in fc["filters"] for vh in f["typed_config"]["route_config"]["virtual_hosts"]
                  for r in vh["routes"]]
        headers = {h["header"]["header_name"] for r in routes for h in r["route"].get("hash_policy", [])
                   if "header" in h}
        self.require(headers == {SESSION_HEADER}, f"envoy: routes hash on {sorted(headers)}, not {SESSION_HEADER}")
        (cluster,) = envoy["static_resources"]["clusters"]
        self.require(cluster.get("lb_policy") == "RING_HASH" and cluster.get("type") == "STRICT_DNS",
                     "envoy: the cluster should be STRICT_DNS with lb_policy RING_HASH")
        addrs = [e["endpoint"]["address"]["socket_address"] for lep in cluster["load_assignment"]["endpoints"]
                 for e in lep["lb_endpoints"]]
        want = f"{headless['metadata']['name']}.{namespace}.svc.cluster.local"
        self.require([(a["address"], a["port_value"]) for a in addrs] == [(want, grpc_port)],
                     f"envoy: endpoints {addrs} should be [{want}:{grpc_port}]")

    def run(self):
        self.hadolint()
        self.yamllint()
        self.kubernetes_validate()
        try:
            self.semantics()
        except (KeyError, TypeError, ValueError, IndexError) as e:
            self.fail(f"manifests do not have the expected shape: {type(e).__name__}: {e}")
        return self.failures


def check(root, tools_dir, k8s_version):
    return Checker(root, tools_dir, k8s_version).run()


def copy_tree(src_root, dst_root):
    for rel in ("Dockerfile", "deploy/k8s", "deploy/config/example.yaml"):
        src, dst = Path(src_root) / rel, Path(dst_root) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def edit(path, old, new):
    text = path.read_text()
    if old not in text:
        raise AssertionError(f"self-test: {old!r} not in {path}")
    path.write_text(text.replace(old, new, 1))


# (what, file, old text, new text, a substring the failure must contain)
BREAKAGES = [
    ("Deployment with a wrong field type (replicas: \"two\")",
     "deploy/k8s/deployment.yaml", "replicas: 2 ", "replicas: \"two\" ", "'two' is not of type 'integer'"),
    ("Deployment port as a string",
     "deploy/k8s/deployment.yaml", "containerPort: 50051", "containerPort: \"fifty\"", "'fifty' is not of type"),
    ("HPA with an unknown field (strict schema)",
     "deploy/k8s/hpa.yaml", "minReplicas: 2", "minReplica: 2", "minReplica"),
    ("Dockerfile lint finding (cd in RUN: DL3003)",
     "Dockerfile", "WORKDIR /src\n", "WORKDIR /src\nRUN cd /tmp && touch x\n", "DL3003"),
    ("YAML lint finding (trailing spaces)",
     "deploy/k8s/service.yaml", "type: ClusterIP\n", "type: ClusterIP   \n", "trailing-spaces"),
    ("grace period shorter than preStop + drain",
     "deploy/k8s/deployment.yaml", "terminationGracePeriodSeconds: 60", "terminationGracePeriodSeconds: 30",
     "terminationGracePeriodSeconds 30 <"),
    ("startup probe too short for model loading",
     "deploy/k8s/deployment.yaml", "failureThreshold: 66", "failureThreshold: 6", "startupProbe allows 60 s"),
    ("unknown server config key",
     "deploy/k8s/configmap-model.yaml", "max_batch_tokens: 4096", "max_batch_tokenz: 4096", "max_batch_tokenz"),
    ("Envoy hashing on another header",
     "deploy/k8s/envoy-configmap.yaml", "header_name: x-mqa-session-key", "header_name: x-session", "x-session"),
    ("manifest not listed in kustomization.yaml",
     "deploy/k8s/kustomization.yaml", "  - pdb.yaml\n", "", "kustomization.yaml resources"),
]


def self_test(root, tools_dir, k8s_version):
    ok = True
    with tempfile.TemporaryDirectory(prefix="mqa-deploy-selftest-") as tmp:
        base = Path(tmp) / "pristine"
        copy_tree(root, base)
        failures = check(base, tools_dir, k8s_version)
        if failures:
            print("self-test: the unmodified copy fails:\n  " + "\n  ".join(failures))
            return False
        print("self-test: the unmodified copy passes")
        for i, (what, rel, old, new, expect) in enumerate(BREAKAGES):
            broken = Path(tmp) / f"broken{i}"
            copy_tree(root, broken)
            edit(broken / rel, old, new)
            failures = check(broken, tools_dir, k8s_version)
            hits = [f for f in failures if expect in f]
            if hits:
                line = next(ln for ln in hits[0].splitlines() if expect in ln)
                print(f"self-test: caught: {what}: {line.strip()}")
            else:
                print(f"self-test: MISSED: {what} (no failure mentions {expect!r}; got {failures})")
                ok = False
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2]), help="the repository root")
    ap.add_argument("--tools-dir", default="", help="where hadolint, yamllint, kubernetes-validate are (the venv's bin)")
    ap.add_argument("--kubernetes-version", default=DEFAULT_K8S_VERSION)
    ap.add_argument("--self-test", action="store_true", help="break copies of the files and expect failures")
    args = ap.parse_args()
    if args.self_test:
        ok = self_test(args.root, args.tools_dir, args.kubernetes_version)
        print("self-test: " + ("passed" if ok else "FAILED"))
        return 0 if ok else 1
    failures = check(args.root, args.tools_dir, args.kubernetes_version)
    for f in failures:
        print("FAIL: " + f)
    if not failures:
        print(f"deploy checks passed: Dockerfile (hadolint), deploy/k8s (yamllint, kubernetes-validate "
              f"{args.kubernetes_version} --strict, cross-file checks)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
