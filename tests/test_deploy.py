"""Every deployment file parses and says what the product needs (GPUs, queues, one beat)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scheduler.audits import AuditError, load_audits

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_REQUIRED = {"apiVersion", "kind", "metadata"}


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_compose_has_the_whole_installation() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "minio", "scheduler", "worker-gpu", "flower", "migrate"} <= set(services)
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        build = svc.get("build")
        if build:
            assert (DEPLOY.parent / build["dockerfile"]).exists(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?:(?P<op>:[?-])(?P<arg>[^}]*))?\}")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} (a KeyError for a missing required one)."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VARIABLE.sub(one, value)


def _strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in _strings(key) + _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [node] if isinstance(node, str) else []


def test_compose_needs_credentials_from_the_environment_and_publishes_on_localhost() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    credentials = {
        "POSTGRES_PASSWORD": "pg-pass-1",
        "MINIO_ROOT_USER": "minio-user",
        "MINIO_ROOT_PASSWORD": "minio-pass-1",
        "FLOWER_BASIC_AUTH": "admin:flower-pass-1",
    }
    for missing in credentials:
        env = {name: value for name, value in credentials.items() if name != missing}
        with pytest.raises(KeyError, match=missing):
            for value in _strings(compose):
                _interpolate(value, env)
    services = compose["services"]
    shown = [_interpolate(value, credentials) for value in _strings(compose)]
    env_of = {name: svc.get("environment", {}) for name, svc in services.items()}
    assert _interpolate(env_of["postgres"]["POSTGRES_PASSWORD"], credentials) == "pg-pass-1"
    assert _interpolate(env_of["minio"]["MINIO_ROOT_PASSWORD"], credentials) == "minio-pass-1"
    assert any("postgresql://camaudit:pg-pass-1@postgres" in value for value in shown)
    assert _interpolate(env_of["flower"]["FLOWER_BASIC_AUTH"], credentials) == "admin:flower-pass-1"
    for secret_like in ("camaudit-secret", "POSTGRES_PASSWORD: camaudit\n", "camaudit:camaudit@"):
        assert secret_like not in text
    published = [
        (name, _interpolate(str(port), credentials))
        for name, svc in services.items()
        for port in svc.get("ports", [])
    ]
    assert {name for name, _ in published} == {"minio", "flower"}
    for name, port in published:
        assert port.startswith("127.0.0.1:"), (name, port)
    wider = _interpolate(
        str(services["flower"]["ports"][0]), {**credentials, "CAMAUDIT_PUBLISH_ADDRESS": "0.0.0.0"}
    )
    assert wider == "0.0.0.0:5555:5555"


def test_kubernetes_manifests_are_well_formed() -> None:
    docs = k8s_docs()
    assert docs
    for doc in docs:
        assert set(doc) >= K8S_REQUIRED, doc
        assert doc["metadata"].get("name")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "camaudit-worker-gpu") in kinds
    assert ("ScaledObject", "camaudit-worker-gpu") in kinds
    gpu = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "camaudit-worker-gpu"
    )
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["spec"]["selector"]["matchLabels"] == gpu["spec"]["template"]["metadata"]["labels"]
    beat = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "camaudit-beat")
    assert beat["spec"]["replicas"] == 1
    scaler = next(d for d in docs if d["kind"] == "ScaledObject")
    assert scaler["spec"]["triggers"][0]["metadata"]["listName"] == "gpu"


def test_k8s_commands_are_real_cli_commands() -> None:
    """Each container's args start with a command the CLI really has."""
    out = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for doc in k8s_docs():
        spec = doc.get("spec", {})
        template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
        if not template:
            continue
        for container in template["spec"]["containers"]:
            if container["image"].startswith("camaudit:"):
                assert re.search(rf"\b{container['args'][0]}\b", out), container["args"]


def test_dockerfiles_install_the_project() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DEPLOY / "docker" / name).read_text()
        assert text.startswith("#") and "\nFROM " in text
        assert "pip install ." in text and 'ENTRYPOINT ["camaudit"]' in text


def test_example_audits_and_the_configmap_copy_validate(tmp_path: Path) -> None:
    audits = load_audits(DEPLOY / "audits.example.yaml")
    assert set(audits) == {"nightly-val", "weekly-shapes"}
    cm = next(
        d for d in k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "camaudit-audits"
    )
    copy = tmp_path / "audits.yaml"
    copy.write_text(cm["data"]["audits.yaml"])
    assert "nightly-val" in load_audits(copy)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("audits: []", "top-level 'audits:'"),
        ("audits:\n  - {name: a, schedule: '0 2 * *', source: x}", "5 cron fields"),
        ("audits:\n  - {name: a, schedule: '0 2 * * *', source: x, methds: [cam]}", "methds"),
        (
            "audits:\n  - {name: a, schedule: '0 2 * * *', source: x}\n"
            "  - {name: a, schedule: '1 2 * * *', source: y}",
            "twice",
        ),
    ],
)
def test_bad_audit_files_are_refused(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "audits.yaml"
    path.write_text(text)
    with pytest.raises(AuditError, match=re.escape(words)):
        load_audits(path)


def test_services_script_starts_a_throwaway_postgres_and_leaves_the_system_config_alone() -> None:
    """`make test` on a machine with nothing on the port: a private cluster, no system pg_hba.conf edit."""
    import hashlib
    import os
    import shutil
    import tempfile

    from tests.plugins.s3 import free_port

    system_hba = sorted(Path("/etc/postgresql").glob("*/*/pg_hba.conf"))
    before = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in system_hba}
    # Not below pytest's own folder: the postgres user cannot enter root's 0700 folders.
    home = Path(tempfile.mkdtemp(prefix="camaudit-test-pg-"))
    port, data = free_port(), home / "pg"
    env = {**os.environ, "PG_PORT": str(port), "CAMAUDIT_TEST_PGDATA": str(data)}
    bin_dir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    as_owner = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    if os.getuid() == 0:
        shutil.chown(home, "postgres")
    try:
        done = subprocess.run(
            ["bash", str(DEPLOY / "local" / "services.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert f"postgresql on 127.0.0.1:{port}" in done.stdout
        query = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-tAc",
                "show listen_addresses; show hba_file",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert query.stdout.split() == ["127.0.0.1", str(data / "pg_hba.conf")], query
        databases = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-tAc",
                "select datname from pg_database",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        assert "test" in databases
    finally:
        subprocess.run(
            [*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data), "stop", "-w"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(home, ignore_errors=True)
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in system_hba} == before


def test_example_audit_alerts_and_prometheus_rules_use_what_camaudit_exports() -> None:
    from prometheus_client import generate_latest

    from scheduler.alerts import RunFacts
    from workers import metrics

    rules = load_audits(DEPLOY / "audits.example.yaml")["nightly-val"].alerts
    assert rules is not None and rules.drifted_classes is not None and rules.status == ["partial", "failed"]
    metrics.record_audit(RunFacts("r", "deploy-check", "finished", 1, 0, 1.0, None, "b", [], []), fired=0)
    exported = set(re.findall(r"^# TYPE (\w+) gauge", generate_latest(metrics.REGISTRY).decode(), re.M))
    groups = yaml.safe_load((DEPLOY / "prometheus" / "camaudit-alerts.yaml").read_text())["groups"]
    exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"camaudit_\w+", expr)}
    assert len(exprs) >= 5 and used and used <= exported, used - exported
