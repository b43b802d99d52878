"""The container image and the Kubernetes manifests: what makes a preemption end in a hand-back
rather than a SIGKILL is written in them, so they are checked like code.

Every manifest is validated against the Kubernetes schemas (kubernetes-validate, offline);
KEDA's custom resources have no schema there and are checked by hand. The example overlay
is rendered with `kubectl kustomize` (in CI a missing kubectl fails, never skips) and the
rendering is checked as a whole: every reference between its objects resolves. The
Dockerfile's instructions are checked here; tests/test_image.py builds and runs the image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from conftest import IN_CI
from spotrun.jobs import JobState
from spotrun.store import JobStore

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "base"
EXAMPLE = ROOT / "deploy" / "overlays" / "example"
# 1.29: the first release with native sidecars on by default; and the newest schemas.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "busybox"}
GKE_SPOT = "cloud.google.com/gke-spot"
GKE_SPOT_MAX_GRACE = 15  # what GKE gives non-system pods when it preempts a Spot node

Doc = dict[str, Any]


# ---------------------------------------------------------------------- loading


def _yaml_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def load_base() -> list[Doc]:
    """The base's resources, in the order its kustomization lists them."""
    kustomization = _yaml_docs(BASE / "kustomization.yaml")[0]
    return [d for name in kustomization["resources"] for d in _yaml_docs(BASE / name)]


def render(directory: Path) -> list[Doc]:
    """``kustomize build`` of ``directory``, with kubectl's kustomize or the standalone one."""
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(directory)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(directory)]
    else:
        why = "neither kubectl nor kustomize is installed: cannot render the overlay"
        if IN_CI:
            pytest.fail(why)  # CI must render what `kubectl apply -k` would apply
        # Locally the base manifests are still validated one by one.
        pytest.skip(why)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return load_base()


@pytest.fixture(scope="module")
def rendered() -> list[Doc]:
    return render(EXAMPLE)


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def deployments(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] == "Deployment"]


def pod(deploy: Doc) -> Doc:
    spec: Doc = deploy["spec"]["template"]["spec"]
    return spec


def containers(deploy: Doc) -> Iterator[Doc]:
    yield from pod(deploy).get("initContainers", [])
    yield from pod(deploy)["containers"]


def main_container(deploy: Doc) -> Doc:
    c: Doc = pod(deploy)["containers"][0]
    return c


def env(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """The container's environment, ConfigMap references resolved, Secrets named."""
    out: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
            continue
        src = e["valueFrom"]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            out[e["name"]] = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            out[e["name"]] = f"<secret {ref['name']}/{ref['key']}>"
    return out


def worker_deployments(docs: list[Doc]) -> list[Doc]:
    return [d for d in deployments(docs)
            if d["spec"]["template"]["metadata"]["labels"].get(
                "app.kubernetes.io/component") == "worker"]


def flag_value(args: list[str], flag: str) -> str | None:
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert m, f"not a Go duration this test knows: {duration!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)]


# ------------------------------------------------------------- schema validation


def test_the_kustomization_lists_every_manifest_of_the_base() -> None:
    listed = set(_yaml_docs(BASE / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def _validate_all(docs: list[Doc], version: str) -> list[str]:
    checked = []
    for d in docs:
        if d["apiVersion"].startswith("keda.sh/"):
            continue  # custom resources: no schema here, see test_keda_*
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{d['kind']}/{d['metadata']['name']} is not valid Kubernetes "
                        f"{version}: {path}: {exc.message}")
        checked.append(d["kind"])
    return checked


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_base_manifest_is_valid_kubernetes(base: list[Doc], version: str) -> None:
    kinds = _validate_all(base, version)
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ServiceAccount",
            "NetworkPolicy", "Namespace"} <= set(kinds)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_rendered_example_overlay_is_valid_kubernetes(rendered: list[Doc],
                                                          version: str) -> None:
    _validate_all(rendered, version)


# Made by hand (it holds passwords), never rendered: docs/deploy-gke.md step 5.
HAND_MADE_SECRETS = {"spotrun-db"}


def _pod_refs(p: Doc) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key) of every ConfigMap, Secret and ServiceAccount a pod spec uses."""
    yield "ServiceAccount", p.get("serviceAccountName", "default"), None
    for c in [*p.get("initContainers", []), *p["containers"]]:
        for e in c.get("env", []):
            src = e.get("valueFrom", {})
            if "configMapKeyRef" in src:
                yield "ConfigMap", src["configMapKeyRef"]["name"], src["configMapKeyRef"]["key"]
            if "secretKeyRef" in src:
                yield "Secret", src["secretKeyRef"]["name"], src["secretKeyRef"]["key"]
        for f in c.get("envFrom", []):
            if "configMapRef" in f:
                yield "ConfigMap", f["configMapRef"]["name"], None
            if "secretRef" in f:
                yield "Secret", f["secretRef"]["name"], None
    for v in p.get("volumes", []):
        if "configMap" in v:
            yield "ConfigMap", v["configMap"]["name"], None
        if "secret" in v:
            yield "Secret", v["secret"]["secretName"], None


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_rendered_overlay_holds_together(rendered: list[Doc]) -> None:
    """What no per-object schema sees: every reference resolves inside the rendering."""
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    namespaces = {d["metadata"]["name"] for d in rendered if d["kind"] == "Namespace"}
    assert namespaces == {"spotrun"}
    keys = [(d["kind"], d["metadata"]["name"]) for d in rendered]
    assert len(keys) == len(set(keys)), "two objects of one kind share a name"
    for d in rendered:
        if d["kind"] not in cluster_scoped:
            assert d["metadata"].get("namespace") == "spotrun", d["metadata"]
    by_kind: dict[str, dict[str, Doc]] = {}
    for d in rendered:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d

    pod_labels = []
    for d in deployments(rendered):
        p = pod(d)
        pod_labels.append(d["spec"]["template"]["metadata"]["labels"])
        for kind, name, key in _pod_refs(p):
            if kind == "Secret" and name in HAND_MADE_SECRETS:
                continue
            obj = by_kind.get(kind, {}).get(name)
            assert obj is not None, f"{d['metadata']['name']} uses {kind}/{name}, not rendered"
            if key is not None:
                assert key in obj.get("data", {}), f"{kind}/{name} has no key {key}"
        for c in containers(d):
            # The overlay's image replaced the base's placeholder name everywhere.
            assert c["image"] != "spotrun" and ":" in c["image"], c["image"]
    for svc in by_kind.get("Service", {}).values():
        assert any(_selects(svc["spec"]["selector"], lbl) for lbl in pod_labels), svc
    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(_selects(sel, lbl) for lbl in pod_labels), pdb
    for so in by_kind.get("ScaledObject", {}).values():
        target = so["spec"]["scaleTargetRef"]
        assert target["name"] in by_kind["Deployment"], target
        for trig in so["spec"]["triggers"]:
            ref = trig.get("authenticationRef")
            if ref:
                assert ref["name"] in by_kind["TriggerAuthentication"], ref
    for rb in by_kind.get("RoleBinding", {}).values():
        assert rb["roleRef"]["name"] in by_kind.get(rb["roleRef"]["kind"], {}), rb["roleRef"]
        for sub in rb["subjects"]:
            assert sub["kind"] == "ServiceAccount" and sub["name"] in by_kind["ServiceAccount"]
            assert sub.get("namespace") == rb["metadata"]["namespace"], sub
    # The workers' service account may patch pods (their deletion cost) and nothing else.
    role = by_kind["Role"]["spotrun-pod-deletion-cost"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    for d in worker_deployments(rendered):
        name_ref = next(e for e in main_container(d)["env"] if e["name"] == "SPOTRUN_POD_NAME")
        assert name_ref["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert pod(d)["serviceAccountName"] in {
            s["name"] for rb in by_kind["RoleBinding"].values() for s in rb["subjects"]}


def test_the_example_overlay_fills_in_every_placeholder(rendered: list[Doc]) -> None:
    text = yaml.safe_dump_all(rendered)
    for placeholder in ("PROJECT_ID", "BUCKET", "REGION:INSTANCE"):
        assert placeholder not in text
    for d in deployments(rendered):
        for c in containers(d):
            assert c["image"] != "spotrun", "the overlay must name the pushed image"
    assert {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"} \
        == {"spotrun"}
    worker = find(rendered, "Deployment", "spotrun-worker-spot")
    assert env(main_container(worker), rendered)["SPOTRUN_CHECKPOINT_URL"].startswith("gs://")


# ----------------------------------------------------------------------- workers


def test_spot_workers_run_on_the_spot_pool(base: list[Doc]) -> None:
    spot = find(base, "Deployment", "spotrun-worker-spot")
    spec = pod(spot)
    assert spec["nodeSelector"] == {GKE_SPOT: "true"}
    assert {"key": GKE_SPOT, "operator": "Equal", "value": "true",
            "effect": "NoSchedule"} in spec["tolerations"]
    assert main_container(spot)["args"] == ["worker", "--pool", "spot"]
    assert env(main_container(spot), base)["SPOTRUN_POOL"] == "spot"
    # KEDA owns the replica count; a `replicas:` would be reset by every apply.
    assert "replicas" not in spot["spec"]


@pytest.mark.parametrize("name", ["spotrun-worker-on-demand", "spotrun-api",
                                  "spotrun-sql-proxy", "spotrun-intake-pubsub"])
def test_everything_else_stays_off_spot_nodes(base: list[Doc], name: str) -> None:
    spec = pod(find(base, "Deployment", name))
    assert GKE_SPOT not in spec.get("nodeSelector", {})
    assert not [t for t in spec.get("tolerations", []) if t.get("key") == GKE_SPOT]
    terms = spec["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert all({"key": GKE_SPOT, "operator": "DoesNotExist"} in t["matchExpressions"]
               for t in terms)


def test_the_on_demand_worker(base: list[Doc]) -> None:
    d = find(base, "Deployment", "spotrun-worker-on-demand")
    assert main_container(d)["args"] == ["worker", "--pool", "on-demand"]
    assert env(main_container(d), base)["SPOTRUN_POOL"] == "on-demand"
    assert d["spec"]["replicas"] >= 1


def test_grace_periods_fit_the_budget(base: list[Doc]) -> None:
    workers = worker_deployments(base)
    assert len(workers) == 2
    for d in workers:
        grace = pod(d)["terminationGracePeriodSeconds"]
        e = env(main_container(d), base)
        budget = float(e["SPOTRUN_GRACE_SECONDS"])
        assert budget <= grace, f"{d['metadata']['name']}: SIGKILL before the budget ends"
        # What `spotrun doctor` compares the budget with (the downward API lacks it).
        assert float(e["SPOTRUN_POD_TERMINATION_GRACE_SECONDS"]) == grace
        proxy = pod(d)["initContainers"][0]
        delay = seconds(flag_value(proxy["args"], "--max-sigterm-delay") or "")
        assert budget <= delay <= grace, "the proxy should hold out for the whole budget"
    spot = find(base, "Deployment", "spotrun-worker-spot")
    assert pod(spot)["terminationGracePeriodSeconds"] == GKE_SPOT_MAX_GRACE


def test_checkpoints_go_to_a_bucket(base: list[Doc]) -> None:
    for d in worker_deployments(base):
        assert env(main_container(d), base)["SPOTRUN_CHECKPOINT_URL"].startswith("gs://")


# ------------------------------------------------------------------ the database


def test_every_database_user_has_a_native_cloud_sql_proxy_sidecar(base: list[Doc]) -> None:
    users = [d for d in deployments(base)
             if "SPOTRUN_DATABASE_URL" in env(main_container(d), base)]
    assert {d["metadata"]["name"] for d in users} == {
        "spotrun-api", "spotrun-worker-spot", "spotrun-worker-on-demand",
        "spotrun-intake-pubsub"}
    for d in users:
        name = d["metadata"]["name"]
        assert env(main_container(d), base)["SPOTRUN_DATABASE_URL"] == \
            "<secret spotrun-db/database-url>"
        sidecars = [c for c in pod(d).get("initContainers", [])
                    if "cloud-sql-proxy" in c["image"]]
        assert len(sidecars) == 1, f"{name}: no Cloud SQL Auth Proxy init container"
        proxy = sidecars[0]
        # Native: outlives the main container, so a hand-back keeps its connection.
        assert proxy.get("restartPolicy") == "Always", f"{name}: not a native sidecar"
        assert flag_value(proxy["args"], "--max-sigterm-delay"), name
        assert "--exit-zero-on-sigterm" in proxy["args"], name
        assert "--port=5432" in proxy["args"], name  # the localhost port of the URL
        assert "startupProbe" in proxy, f"{name}: the app could start before the proxy"
        # Not also a classic sidecar, which would get SIGTERM with the app.
        assert not [c for c in pod(d)["containers"] if "cloud-sql-proxy" in c["image"]]
        # $(CLOUDSQL_INSTANCE) must be defined for the kubelet to expand it.
        assert "$(CLOUDSQL_INSTANCE)" in proxy["args"]
        assert "CLOUDSQL_INSTANCE" in env(proxy, base)


# ----------------------------------------------------------------- autoscaling


def test_keda_scales_the_spot_workers_on_the_queue(base: list[Doc]) -> None:
    so = find(base, "ScaledObject", "spotrun-worker-spot")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == "spotrun-worker-spot"
    find(base, "Deployment", target["name"])
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount",
                         "pollingInterval", "cooldownPeriod", "idleReplicaCount",
                         "advanced", "triggers", "fallback"}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
    query = " ".join(meta["query"].split())
    # Counts only: KEDA's user reads a view of how many jobs each pool has, never the jobs.
    assert query.startswith("SELECT coalesce(sum(jobs), 0) FROM spotrun_pool_demand")
    assert " jobs " not in query.replace("sum(jobs)", "")
    assert "state = 'queued'" in query and "state = 'running'" in query
    assert float(meta["targetQueryValue"]) > 0
    auth = find(base, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref == {"parameter": "connection", "name": "spotrun-db", "key": "keda-connection"}
    # KEDA reaches the database through the proxy Service, not a pod's localhost.
    find(base, "Service", "spotrun-sql-proxy")


def test_the_keda_query_counts_the_work_spot_workers_could_do(store: JobStore) -> None:
    query = find(load_base(), "ScaledObject", "spotrun-worker-spot")["spec"]["triggers"][0][
        "metadata"]["query"]
    spot = store.register_worker(name="s", host="h", pid=1, pool="spot", has_cuda=False,
                                 lease_seconds=10)
    on_demand = store.register_worker(name="o", host="h", pid=2, pool="on-demand",
                                      has_cuda=False, lease_seconds=10)
    store.submit("sleep", {})
    store.submit("sleep", {})
    assert store.claim(worker_id=spot, worker_name="s", lease_seconds=10, pool="spot")
    assert store.claim(worker_id=on_demand, worker_name="o", lease_seconds=10,
                       pool="on-demand")
    store.submit("sleep", {})  # counted: any pool
    store.submit("sleep", {}, pool="spot")  # counted
    store.submit("sleep", {}, pool="on-demand")  # not: spot workers may not take it
    store.submit("sleep", {}, requires_cuda=True)  # not: these workers have no GPU
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        count = conn.execute(sa.text(query)).scalar_one()
    assert count == 3  # 1 running on a spot worker + 2 queued it could claim
    assert store.analytics.count_by_state()[JobState.QUEUED.value] == 4


# --------------------------------------------------------------------- the API


def test_the_api_serves_on_8000_with_health_probes(base: list[Doc]) -> None:
    api = find(base, "Deployment", "spotrun-api")
    c = main_container(api)
    assert c["args"] == ["server", "--host", "0.0.0.0", "--port", "8000"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 8000

    def port(probe: Doc) -> int:
        p = probe["httpGet"]["port"]
        return ports[p] if isinstance(p, str) else int(p)

    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert port(c["readinessProbe"]) == port(c["livenessProbe"]) == 8000
    svc = find(base, "Service", "spotrun-api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", 8000)


def test_the_pdb_selects_the_api_and_only_the_api(base: list[Doc]) -> None:
    pdb = find(base, "PodDisruptionBudget", "spotrun-api")
    selector = pdb["spec"]["selector"]["matchLabels"].items()
    for d in deployments(base):
        labels = d["spec"]["template"]["metadata"]["labels"].items()
        assert (selector <= labels) == (d["metadata"]["name"] == "spotrun-api")
    assert pdb["spec"]["minAvailable"] >= 1


def test_deployment_selectors_match_their_pods_and_no_other(base: list[Doc]) -> None:
    deps = deployments(base)
    for d in deps:
        selector = d["spec"]["selector"]["matchLabels"].items()
        for other in deps:
            labels = other["spec"]["template"]["metadata"]["labels"].items()
            assert (selector <= labels) == (other is d), (d["metadata"]["name"],
                                                          other["metadata"]["name"])


# -------------------------------------------------------------- signals, users


def _command_lines(d: Doc) -> Iterator[tuple[str, list[str]]]:
    for c in containers(d):
        yield c["name"], [*c.get("command", []), *c.get("args", [])]
        for key in ("livenessProbe", "readinessProbe", "startupProbe"):
            if "exec" in c.get(key, {}):
                yield f"{c['name']} {key}", c[key]["exec"]["command"]
        for hook in c.get("lifecycle", {}).values():
            if "exec" in hook:
                yield f"{c['name']} hook", hook["exec"]["command"]


def test_no_command_line_goes_through_a_shell(base: list[Doc]) -> None:
    for d in deployments(base):
        for where, argv in _command_lines(d):
            assert all(isinstance(a, str) for a in argv), where
            if argv:
                assert os.path.basename(argv[0]) not in SHELLS, f"{where}: {argv}"
            assert "-c" not in argv[:2], f"{where}: {argv}"
        for c in containers(d):
            if c["image"] == "spotrun":
                # Keep the image's ENTRYPOINT (tini): `command` would replace it.
                assert "command" not in c, f"{d['metadata']['name']}/{c['name']}"
                assert c["args"], "the spotrun command to run"


def test_every_pod_runs_as_non_root(base: list[Doc]) -> None:
    for d in deployments(base):
        sc = pod(d)["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc.get("runAsUser", 1) != 0
        for c in containers(d):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False
            assert csc["capabilities"]["drop"] == ["ALL"]
            assert csc.get("runAsUser", 1) != 0
            if csc.get("readOnlyRootFilesystem") and c["image"] == "spotrun":
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert {"/var/lib/spotrun", "/tmp"} <= mounts, "SPOTRUN_HOME must be writable"


# -------------------------------------------------------------------- the image


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _one(instructions: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in instructions if w == word]
    assert len(found) == 1, f"expected one {word}, found {found}"
    return found[0]


def test_the_image_runs_spotrun_under_tini_in_exec_form(dockerfile: list[tuple[str, str]]
                                                        ) -> None:
    final = _final_stage(dockerfile)
    for word in ("ENTRYPOINT", "CMD"):
        rest = _one(final, word)
        assert rest.startswith("["), f"{word} in shell form runs `/bin/sh -c` as PID 1"
        argv = json.loads(rest)
        assert all(isinstance(a, str) for a in argv)
        if word == "ENTRYPOINT":
            assert os.path.basename(argv[0]) in ("tini", "dumb-init"), argv
            assert argv[-1] == "spotrun" and "sh" not in argv
        else:
            assert argv == ["worker"]
    assert _one(final, "STOPSIGNAL") == "SIGTERM"
    assert any("install" in rest and "tini" in rest for w, rest in final if w == "RUN")


def test_the_image_runs_as_a_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    final = _final_stage(dockerfile)
    user = _one(final, "USER").split(":")[0]
    assert user not in ("root", "0", "")
    # The last USER wins: nothing after it may switch back.
    assert [w for w, _ in final].index("USER") > max(
        i for i, (w, _) in enumerate(final) if w in ("RUN", "COPY"))
    env_lines = " ".join(rest for w, rest in final if w == "ENV")
    home = re.search(r"SPOTRUN_HOME=(\S+)", env_lines)
    assert home, "SPOTRUN_HOME must point at a writable directory"
    assert any(home.group(1) in rest and "chown" in rest for w, rest in final if w == "RUN")


def test_the_image_installs_the_extras_and_a_pinned_torch(dockerfile: list[tuple[str, str]]
                                                          ) -> None:
    args = dict(rest.split("=", 1) for w, rest in dockerfile if w == "ARG" and "=" in rest)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert "TORCH_INDEX_URL" in args
    runs = " ".join(rest for w, rest in dockerfile if w == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs and '"torch==${TORCH_VERSION}"' in runs
    # The local-wheel arguments change nothing unless given: a user with the internet
    # gets torch from the CPU index and the rest from PyPI.
    assert args["PIP_FIND_LINKS"] == args["PIP_INDEX_URL"] == '""'
    assert '${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"}' in runs
    # The dependencies of these extras go into the image, and spotrun on top of them.
    assert args["SPOTRUN_EXTRAS"] == "ml,s3,gcs,pubsub"
    assert "-r /tmp/requirements.txt" in runs and "/tmp/dist/spotrun-*.whl" in runs
    # The default torch must satisfy the package's own ml extra.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_req = next(Requirement(r) for r in pyproject["project"]["optional-dependencies"]["ml"]
                     if Requirement(r).name == "torch")
    assert torch_req.specifier.contains(args["TORCH_VERSION"])


def test_the_build_context_leaves_out_what_the_image_does_not_need() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "venv", "tests", "deploy"} <= ignored


def test_the_pubsub_intake_is_configured_and_stops_inside_its_grace_period(
        base: list[Doc]) -> None:
    d = find(base, "Deployment", "spotrun-intake-pubsub")
    c = main_container(d)
    assert c["args"] == ["intake", "pubsub"]
    e = env(c, base)
    for key in ("SPOTRUN_PUBSUB_PROJECT", "SPOTRUN_PUBSUB_SUBSCRIPTION",
                "SPOTRUN_PUBSUB_EVENTS_TOPIC", "SPOTRUN_PUBSUB_OWNER"):
        assert e[key] and not e[key].startswith("<"), key
    grace = pod(d)["terminationGracePeriodSeconds"]
    assert float(e["SPOTRUN_GRACE_SECONDS"]) < grace
    proxy = pod(d)["initContainers"][0]
    assert float(e["SPOTRUN_GRACE_SECONDS"]) <= seconds(
        flag_value(proxy["args"], "--max-sigterm-delay") or "") <= grace


# ------------------------------------------------------------------ least privilege


def test_keda_reads_counts_and_nothing_else(pg_url: str) -> None:
    """KEDA's user, granted the one view, counts the queue and cannot read a job."""
    import psycopg

    query = find(load_base(), "ScaledObject", "spotrun-worker-spot")["spec"]["triggers"][0][
        "metadata"]["query"]
    store = JobStore.open(pg_url)
    try:
        store.submit("sleep", {}, owner="alice")
        role = f"keda_{uuid.uuid4().hex[:8]}"
        admin_url = pg_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute(f"GRANT SELECT ON spotrun_pool_demand TO {role}")
        try:
            reader = admin_url.replace("postgres@", f"{role}@", 1)
            with psycopg.connect(reader, autocommit=True) as conn:
                assert conn.execute(query).fetchone() == (1,)
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("SELECT params FROM jobs")
        finally:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f"REVOKE ALL ON spotrun_pool_demand FROM {role}")
                conn.execute(f"DROP ROLE {role}")
    finally:
        store.close()


def _egress_blocks(policy: Doc) -> list[dict[str, Any]]:
    return [peer["ipBlock"] for rule in policy["spec"].get("egress", [])
            for peer in rule.get("to", []) if "ipBlock" in peer]


def test_network_policies_keep_the_api_off_the_metadata_service_and_the_cluster(
        base: list[Doc]) -> None:
    private = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
    api = find(base, "NetworkPolicy", "spotrun-api")
    assert set(api["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for block in _egress_blocks(api):
        # Only the GKE metadata server's token endpoint, or public addresses.
        if block["cidr"] != "169.254.169.252/32":
            assert block["cidr"] == "0.0.0.0/0" and set(private) <= set(block["except"])
    assert all("169.254.169.254" not in b["cidr"] for b in _egress_blocks(api))
    workers = find(base, "NetworkPolicy", "spotrun-workers")
    assert workers["spec"]["ingress"] == []  # nothing reaches a worker
    assert {"cidr": "169.254.169.254/32"} in _egress_blocks(workers)  # the notice
    # Every pod of spotrun is selected by a policy.
    selected = [p["spec"]["podSelector"]["matchLabels"]
                for p in base if p["kind"] == "NetworkPolicy"]
    for d in deployments(base):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert any(_selects(sel, labels) for sel in selected), d["metadata"]["name"]


def test_only_the_workers_get_a_kubernetes_api_token(base: list[Doc]) -> None:
    accounts = {d["metadata"]["name"]: d for d in base if d["kind"] == "ServiceAccount"}
    assert set(accounts) == {"spotrun-api", "spotrun-worker", "spotrun-intake",
                             "spotrun-sql-proxy"}
    for d in deployments(base):
        spec = pod(d)
        sa = accounts[spec["serviceAccountName"]]
        mounted = spec.get("automountServiceAccountToken",
                           sa.get("automountServiceAccountToken", True))
        is_worker = d["metadata"]["name"].startswith("spotrun-worker")
        assert mounted == is_worker, d["metadata"]["name"]
        assert (spec["serviceAccountName"] == "spotrun-worker") == is_worker
