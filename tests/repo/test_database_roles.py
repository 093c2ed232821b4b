"""Compose and Kubernetes use the two database roles (deploy/README.md, "Database roles"):
only the migration jobs connect as the owner of the tables; everything else as the app role."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
K8S = ROOT / "deploy" / "k8s"
MIGRATIONS = {"migrate-auth": "auth", "migrate-wallet": "wallet"}


def test_compose_migrates_as_the_owner_and_runs_as_the_app_role() -> None:
    for name, service in COMPOSE["services"].items():
        env = service.get("environment", {})
        for key, url in env.items():
            if not key.endswith("_DATABASE_URL"):
                continue
            db = url.rsplit("/", 1)[1]
            user = re.match(r"postgresql\+psycopg://([^:]+):", url)
            assert user, f"{name}: {key} names no user"
            if key.endswith("_MIGRATION_DATABASE_URL"):
                assert name in MIGRATIONS, f"{name} has the owner's URL"
                assert user.group(1) == f"{db}_owner", f"{name}: {key}"
            else:
                assert user.group(1) == f"{db}_app", f"{name}: {key} must connect as {db}_app"
        if name in MIGRATIONS:
            assert f"{MIGRATIONS[name].upper()}_MIGRATION_DATABASE_URL" in env, name
    assert "${POSTGRES_PASSWORD" not in yaml.safe_dump(
        {n: s for n, s in COMPOSE["services"].items() if n != "postgres"}
    )


def test_kubernetes_gives_the_owners_secret_to_the_migration_jobs_only() -> None:
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["kind"] not in ("Deployment", "Job"):
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                refs = {
                    e["name"]: e["valueFrom"]["secretKeyRef"]
                    for e in container.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})
                }
                owners = {k for k, ref in refs.items() if ref["name"] == "wallet-platform-migrations"}
                if doc["kind"] == "Job":
                    assert owners == {k for k in refs if k.endswith("_MIGRATION_DATABASE_URL")} != set(), path
                    assert any(k.endswith("_DATABASE_URL") and k not in owners for k in refs), path  # the app role
                else:
                    assert not owners, f"{doc['metadata']['name']} reads the owners' secret"
