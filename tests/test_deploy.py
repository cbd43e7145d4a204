"""Every deployment file parses and says what the product needs (GPUs, queues, one beat)."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
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

    from scheduler.alerts import ClassFact, QualityFact, RunFacts
    from workers import metrics

    rules = load_audits(DEPLOY / "audits.example.yaml")["nightly-val"].alerts
    assert rules is not None and rules.drifted_classes is not None and rules.status == ["partial", "failed"]
    drift = [ClassFact("gradcam", "layer4", 0, "cat", 0.5, 0.1, True)]
    quality = [QualityFact("gradcam", "layer4", 3, 0.5)]
    facts = RunFacts("r", "deploy-check", "finished", 1, 0, 1.0, datetime.now(UTC), "b", drift, quality)
    metrics.record_audit(facts, fired=0)
    text = generate_latest(metrics.REGISTRY).decode()
    exported = set(re.findall(r"^# TYPE (\w+) gauge", text, re.M))
    labels: dict[str, set[str]] = {}
    for name, sample_labels in re.findall(r"^(camaudit_\w+)\{(.*)\} ", text, re.M):
        labels.setdefault(name, set()).update(re.findall(r'(\w+)="', sample_labels))
    groups = yaml.safe_load((DEPLOY / "prometheus" / "camaudit-alerts.yaml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    used = {name for rule in rules for name in re.findall(r"camaudit_\w+", rule["expr"])}
    assert len(rules) >= 5 and used and used <= exported, used - exported
    for rule in rules:
        names = re.findall(r"camaudit_\w+", rule["expr"])
        have = set().union(*(labels.get(name, set()) for name in names))
        for name, selector in re.findall(r"(camaudit_\w+)\{([^}]*)\}", rule["expr"]):
            wanted = set(re.findall(r"(\w+)\s*[=!~]", selector))
            assert wanted <= labels.get(name, set()), (rule["alert"], name, wanted - labels.get(name, set()))
        shown = set(re.findall(r"\$labels\.(\w+)", str(rule.get("annotations", {}))))
        assert shown <= have, (rule["alert"], shown - have)


# --------------------------------------------------------------------------- what the files run


def _dockerfile_entrypoint(dockerfile: Path) -> list[str]:
    import json

    found = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile.read_text(), re.M)
    return json.loads(found[1]) if found else []


def _dockerfile_cmd(dockerfile: Path) -> list[str]:
    import json

    found = re.search(r"^CMD (\[.*\])$", dockerfile.read_text(), re.M)
    return json.loads(found[1]) if found else []


def camaudit_command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after ``camaudit``) of every process the deployment files start with the CLI."""
    lines: list[tuple[str, list[str]]] = []
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        dockerfile = DEPLOY / "docker" / name
        if _dockerfile_entrypoint(dockerfile) == ["camaudit"]:
            lines.append((f"{name} CMD", _dockerfile_cmd(dockerfile)))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service, svc in compose["services"].items():
        build = svc.get("build")
        if build and _dockerfile_entrypoint(DEPLOY.parent / build["dockerfile"]) == ["camaudit"]:
            lines.append((f"compose {service}", [str(a) for a in svc["command"]]))
    for doc in k8s_docs():
        spec = doc.get("spec", {})
        template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
        for container in (template or {}).get("spec", {}).get("containers", []):
            if container["image"].startswith("camaudit:"):
                where = f"k8s {doc['kind']} {doc['metadata']['name']}/{container['name']}"
                lines.append((where, [str(a) for a in container["args"]]))
    return lines


def dry_parse(argv: list[str]) -> list[str]:
    """Parse ``camaudit ARGV`` with the real CLI down to the command, converting and checking every
    option and argument, without running it; returns the command path. Raises the CLI's own
    refusal (a ``typer.TyperException``) for what it would refuse, ``typer.Exit`` for ``--help``."""
    import typer.main

    from scheduler.cli import app

    command = typer.main.get_command(app)
    ctx = command.make_context("camaudit", list(argv))
    path = []
    while hasattr(command, "resolve_command"):  # a group: the next word names a command
        rest = [*ctx._protected_args, *ctx.args]
        name, found, rest = command.resolve_command(ctx, rest)
        assert found is not None, name  # resolve_command refuses unknown names itself
        path.append(str(name))
        command = found
        ctx = command.make_context(str(name), rest, parent=ctx)
    return path


def test_the_deployment_runs_commands_the_cli_accepts() -> None:
    """Every `camaudit ...` line in the Dockerfiles, compose and the manifests parses as the CLI
    would parse it in the container (options converted, required arguments present)."""
    lines = camaudit_command_lines()
    where = {w.split(" ")[0] for w, _ in lines}
    assert {"Dockerfile.cpu", "compose", "k8s"} <= where, lines
    ran = set()
    for place, argv in lines:
        if argv == ["--help"]:
            with pytest.raises(typer.Exit) as done:  # the image's default: help, status 0
                dry_parse(argv)
            assert done.value.exit_code == 0
            continue
        try:
            ran.add(" ".join(dry_parse(argv)))
        except typer.TyperException as exc:
            pytest.fail(f"{place} runs `camaudit {' '.join(argv)}`, which the CLI refuses: {exc}")
    assert {"worker", "db upgrade", "beat", "audit run"} <= ran, ran


@pytest.mark.parametrize(
    "argv",
    [
        ["workr", "--queues", "gpu"],
        ["worker", "--queuez", "gpu"],
        ["audit", "run", "--audits", "a.yaml"],  # the audit's name is missing
        ["db", "upgrad"],
    ],
)
def test_a_command_line_the_cli_would_refuse_is_caught(argv: list[str]) -> None:
    with pytest.raises(typer.TyperException):
        dry_parse(argv)


def _audit_variables() -> set[str]:
    """``${NAME}`` the audits files read from the environment (webhook URLs)."""
    texts = [(DEPLOY / "audits.example.yaml").read_text()]
    texts += [
        d["data"]["audits.yaml"]
        for d in k8s_docs()
        if d["kind"] == "ConfigMap" and "audits.yaml" in d.get("data", {})
    ]
    return {name for text in texts for name in re.findall(r"\$\{(\w+)\}", text)}


def deployment_environments() -> dict[str, dict[str, str]]:
    """The environment each camaudit process gets, by where it is set (compose values interpolated
    with test credentials)."""
    credentials = {
        "POSTGRES_PASSWORD": "pg-pass-1",
        "MINIO_ROOT_USER": "minio-user",
        "MINIO_ROOT_PASSWORD": "minio-pass-1",
        "FLOWER_BASIC_AUTH": "admin:flower-pass-1",
    }
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    found = {}
    for service, svc in compose["services"].items():
        if svc.get("build"):
            env = svc.get("environment", {})
            found[f"compose {service}"] = {k: _interpolate(str(v), credentials) for k, v in env.items()}
    docs = k8s_docs()
    sources = {
        (d["kind"], d["metadata"]["name"]): {**d.get("data", {}), **d.get("stringData", {})}
        for d in docs
        if d["kind"] in ("ConfigMap", "Secret")
    }
    for doc in docs:
        spec = doc.get("spec", {})
        template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
        for container in (template or {}).get("spec", {}).get("containers", []):
            if not container["image"].startswith("camaudit:"):
                continue
            env: dict[str, str] = {}
            for ref in container.get("envFrom", []):
                kind, key = (
                    ("ConfigMap", "configMapRef") if "configMapRef" in ref else ("Secret", "secretRef")
                )
                name = ref[key]["name"]
                assert (kind, name) in sources, f"{doc['metadata']['name']} reads unknown {kind} {name}"
                env.update({k: str(v) for k, v in sources[kind, name].items()})
            env.update({e["name"]: str(e.get("value", "")) for e in container.get("env", [])})
            found[f"k8s {doc['metadata']['name']}/{container['name']}"] = env
    return found


def test_every_camaudit_variable_the_deployment_sets_is_a_setting_and_validates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Settings ignores unknown CAMAUDIT_ variables, so a misspelt one would silently do nothing."""
    from schema.settings import Settings

    fields = set(Settings.model_fields)
    read_by_audits = _audit_variables()
    environments = deployment_environments()
    assert any(w.startswith("compose") for w in environments) and any(
        w.startswith("k8s") for w in environments
    )
    for place, env in environments.items():
        ours = {k: v for k, v in env.items() if k.startswith("CAMAUDIT_")}
        assert ours, place
        for name in ours:
            field = name.removeprefix("CAMAUDIT_").lower()
            assert field in fields or name in read_by_audits, (
                f"{place} sets {name}, which is no setting (CAMAUDIT_ + one of {sorted(fields)}) "
                "and no ${{VARIABLE}} of an audits file"
            )
        for name in [k for k in os.environ if k.startswith("CAMAUDIT_")]:
            monkeypatch.delenv(name)
        for name, value in ours.items():
            monkeypatch.setenv(name, value)
        settings = Settings()
        for name, value in ours.items():
            field = name.removeprefix("CAMAUDIT_").lower()
            if field in fields and value:
                assert (
                    str(getattr(settings, field)).lower()
                    == str(type(getattr(settings, field))(value)).lower()
                ), name
        assert not settings.embedded, f"{place} has no broker: its workers would run nothing"


def test_the_audits_the_manifests_run_are_in_the_file_they_mount(tmp_path: Path) -> None:
    docs = k8s_docs()
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    checked = 0
    for doc in docs:
        spec = doc.get("spec", {})
        pod = (spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template") or {}).get(
            "spec", {}
        )
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod.get("containers", []):
            args = [str(a) for a in container.get("args", [])]
            if "--audits" not in args:
                continue
            path = Path(args[args.index("--audits") + 1])
            mount = next(m for m in container["volumeMounts"] if path.parent == Path(m["mountPath"]))
            config = maps[volumes[mount["name"]]["configMap"]["name"]]
            local = tmp_path / path.name
            local.write_text(config["data"][path.name])
            audits = load_audits(local)
            if args[:2] == ["audit", "run"]:
                assert args[2] in audits, (args, sorted(audits))
            checked += 1
    assert checked >= 2
