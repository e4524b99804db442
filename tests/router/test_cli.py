"""``kvtier route`` as a process, and ``kvtier bench route``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import zmq
from tests.router import vllm
from tests.router.live import DEADLINE_S, Publisher, wait

ROOT = Path(__file__).resolve().parents[2]


def kvtier(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def post(url: str, body: object) -> object:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
        return json.loads(response.read())


def test_kvtier_route_serves_until_sigterm() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = Publisher(context)
    tokens = list(range(512))
    hashes = [vllm.as_int(h) for h in vllm.engine_hashes(tokens)]
    process = kvtier(
        "route",
        "--listen",
        "127.0.0.1:0",
        "--pod",
        f"a,org/model,{pub.endpoint}",
        "--set",
        "router.block_tokens=64",
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the service says where it listens
        port = int(re.fullmatch(r"kvtier route listening on port (\d+)\n", line)[1])  # type: ignore[index]
        pub.wait_subscribed()
        pub.send([vllm.stored(hashes, None, tokens)])
        url = f"http://127.0.0.1:{port}"
        wait(lambda: get(f"{url}/v1/pods/a"), lambda p: p["batches"] == 1, "pod a")
        answer = post(f"{url}/v1/route", {"model": "org/model", "token_ids": tokens})
        assert isinstance(answer, dict)
        assert [(p["pod"], p["prefix_blocks"]) for p in answer["pods"]] == [("a", 8)]
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE_S) == 0
    finally:
        process.kill()
        process.communicate()
        pub.close()
        context.destroy(linger=0)


def get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=DEADLINE_S) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def test_a_bad_pod_flag_is_an_error_that_names_the_flag() -> None:
    process = kvtier("route", "--listen", "127.0.0.1:0", "--pod", "a,tcp://x:1")
    _, err = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 1
    assert "--pod needs ID,MODEL,ENDPOINT" in err


def test_a_taken_port_is_an_error_that_names_the_key() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = kvtier("route", "--listen", f"127.0.0.1:{port}")
        _, err = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 1 and "router.listen: cannot listen" in err


@pytest.mark.slow
def test_bench_route_quick_ends_with_one_json_object() -> None:
    process = kvtier("bench", "route", "--quick", "--json", "--repeats", "1")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["ingest_blocks_per_s"] > 0 and figures["route_p99_ms"] > 0
    assert set(figures) >= {
        "ingest_zmq_blocks_per_s",
        "route_p50_ms",
        "index_bytes_per_million_blocks",
        "ingest_bytes_per_million_engine_blocks",
    }
