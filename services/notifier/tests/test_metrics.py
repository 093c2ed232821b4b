"""The notifier's metrics as a scraper sees them, with several worker processes
(PROMETHEUS_MULTIPROC_DIR, as in the Kubernetes manifests): counters add up across
processes, also ones that died, and the dead-letter gauge is still served."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from notifier import actors
from notifier.brevo import Email
from notifier.dedupe import SentMarkers
from svckit.messages import Recipient
from svckit.redis import redis_client
from svckit.testing import free_port, redis_server, scrape_metrics

from .conftest import make_receipt

WORKER = textwrap.dedent(
    """
    import sys

    import redis

    from notifier.metrics import DELIVERED, register_dead_letters
    from svckit.metrics import serve_metrics

    DELIVERED.labels("welcome").inc()
    if sys.argv[1] == "serve":
        register_dead_letters(redis.Redis.from_url(sys.argv[2]))
        serve_metrics(int(sys.argv[3]))
        print("serving", flush=True)
        sys.stdin.read()
    """
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_add_up_across_worker_processes_and_the_dead_letter_gauge_is_served(
    tmp_path: Path, redis_url: str
) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "METRICS_BIND": "127.0.0.1"}
    # A worker that counted one email and died (killed, restarted by its supervisor).
    subprocess.run([sys.executable, "-c", WORKER, "exit"], env=env, check=True, timeout=30)
    port = free_port()
    serving = subprocess.Popen(
        [sys.executable, "-c", WORKER, "serve", redis_url, str(port)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert serving.stdout is not None
        assert serving.stdout.readline() == b"serving\n"
        deadline = time.monotonic() + 10
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        serving.kill()
        serving.wait(10)
    got = samples(text)
    assert got[("notifier_emails_delivered_total", (("kind", "welcome"),))] == 2
    assert got[("notifier_dead_letters", (("queue", "notifications"),))] == 0


class AlreadyThere:
    """A transport whose Brevo already has every email (an earlier attempt got through)."""

    def send(self, email: Email) -> str:
        return "duplicate"


def test_an_email_brevo_already_had_is_counted_apart(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    ctx = actors.Context(transport=AlreadyThere(), markers=markers, auth=httpx.Client())
    monkeypatch.setattr(actors, "context", lambda: ctx)

    def counts() -> tuple[float, float]:
        return tuple(  # type: ignore[return-value]
            REGISTRY.get_sample_value(name, {"kind": "deposit"}) or 0.0
            for name in ("notifier_emails_delivered_total", "notifier_emails_already_at_brevo_total")
        )

    before = counts()
    receipt = make_receipt(recipient=Recipient(email="j@example.com", first_name="J", last_name="D"))
    actors.send_receipt.fn(receipt.model_dump(mode="json"))  # a deposit's
    assert counts() == (before[0] + 1, before[1] + 1)


def image_cmd() -> list[str]:
    """The notifier image's CMD (services/notifier/Dockerfile), as its container runs it."""
    dockerfile = Path(__file__).resolve().parents[1] / "Dockerfile"
    lines = [line for line in dockerfile.read_text().splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1
    cmd: list[str] = json.loads(lines[0].removeprefix("CMD "))
    return cmd


@pytest.mark.parametrize("left", ["nothing", "a previous container's files"])
def test_the_images_command_prepares_the_metrics_folder_for_its_workers(tmp_path: Path, left: str) -> None:
    # PROMETHEUS_MULTIPROC_DIR is set for every pod (the ConfigMap): missing at the first
    # start, and in the pod's emptyDir with the old files after a container restart.
    metrics_dir = tmp_path / "not-yet" / "prometheus"
    stale = metrics_dir / "counter_4242424.db"
    if left != "nothing":
        metrics_dir.mkdir(parents=True)
        stale.write_bytes(b"old")
    port = free_port()
    with redis_server() as url:  # its own: the workers consume the queue
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "METRICS_BIND": "127.0.0.1",
            "NOTIFIER_PROCESSES": "2",
            "NOTIFIER_THREADS": "1",
            "NOTIFIER_REDIS_URL": url,
            "NOTIFIER_METRICS_PORT": str(port),
            "NOTIFIER_OUTBOX_DIR": str(tmp_path / "outbox"),
            "NOTIFIER_SERVICE_TOKEN": secrets.token_urlsafe(32),
        }
        proc = subprocess.Popen(image_cmd(), env=env, cwd=tmp_path, start_new_session=True)
        try:
            # The unlabelled counter's file exists from import on: the folder was there first.
            text = scrape_metrics(port, until="notifier_dead_letters{", proc=proc, timeout_s=90)
            assert "notifier_duplicates_dropped_total 0.0" in text
            deadline = time.monotonic() + 60  # both workers write there (the second may still import)
            while len({p.name.split("_")[-1] for p in metrics_dir.glob("*.db")} - {stale.name.split("_")[-1]}) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert not stale.exists()  # emptied once, before the workers started
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_the_metrics_module_creates_a_missing_folder_itself(tmp_path: Path) -> None:
    """A worker started some other way than the image's CMD (a Kubernetes `command:`, or
    `notifier-dlq`) does not crash on the unlabelled metrics' files at import."""
    metrics_dir = tmp_path / "not-yet"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    subprocess.run([sys.executable, "-c", "import notifier.metrics"], env=env, check=True, timeout=60)
    assert list(metrics_dir.glob("counter_*.db"))
