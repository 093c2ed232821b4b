"""Run a command with TEST_DATABASE_URL pointing at a Postgres server, or say why not.

Order: TEST_DATABASE_URL if set; else a throwaway Postgres container from testcontainers
if a Docker engine answers; else skip (exit 0) with a line saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys


def docker_answers() -> bool:
    try:
        import docker  # installed with testcontainers

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def main() -> int:
    command = sys.argv[1:]
    if os.environ.get("TEST_DATABASE_URL"):
        print(f"postgres pass: using TEST_DATABASE_URL ({os.environ['TEST_DATABASE_URL'].split('@')[-1]})")
        return subprocess.call(command)
    if docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as pg:
            print("postgres pass: using a testcontainers Postgres")
            return subprocess.call(command, env={**os.environ, "TEST_DATABASE_URL": pg.get_connection_url()})
    print("postgres pass: SKIPPED: TEST_DATABASE_URL is not set and no Docker engine answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
