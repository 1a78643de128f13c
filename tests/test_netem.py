"""Collaboration across a real shaped link: the cloud runs in its own network namespace behind a veth
pair with tc netem delay. Skipped, with the reason, where the machine does not allow it."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from cecollm.client import TcpLink, generate_collab
from cecollm.exits import ExitPolicy

pytestmark = [pytest.mark.model, pytest.mark.slow]

DELAY_MS = 25  # each direction: 50 ms round trip


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.fixture
def shaped_namespace():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and tc")
    if not (shutil.which("ip") and shutil.which("tc")):
        pytest.skip("needs iproute2 (ip, tc)")
    tag = os.getpid() % 10000
    ns, a, b = f"cecollm{tag}", f"cea{tag}", f"ceb{tag}"
    net = 200 + tag % 50
    host_ip, cloud_ip = f"10.213.{net}.1", f"10.213.{net}.2"
    steps = [
        ("ip", "netns", "add", ns),
        ("ip", "link", "add", a, "type", "veth", "peer", "name", b),
        ("ip", "link", "set", b, "netns", ns),
        ("ip", "addr", "add", f"{host_ip}/30", "dev", a),
        ("ip", "link", "set", a, "up"),
        ("ip", "netns", "exec", ns, "ip", "addr", "add", f"{cloud_ip}/30", "dev", b),
        ("ip", "netns", "exec", ns, "ip", "link", "set", b, "up"),
        ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"),
        ("tc", "qdisc", "add", "dev", a, "root", "netem", "delay", f"{DELAY_MS}ms"),
        ("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", b, "root", "netem", "delay", f"{DELAY_MS}ms"),
    ]
    try:
        for step in steps:
            out = sh(*step)
            if out.returncode != 0:
                pytest.skip(f"`{' '.join(step)}` failed here: {out.stderr.strip()}")
        yield ns, cloud_ip
    finally:
        sh("ip", "link", "del", a)
        sh("ip", "netns", "del", ns)


def test_collaboration_over_netem(model, shaped_namespace, tmp_path):
    ns, cloud_ip = shaped_namespace
    key_file = tmp_path / "key"
    key_file.write_bytes(b"netem-test-key")
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "cecollm.cli", "serve", "--host",
                               cloud_ip, "--port", "7433", "--split", "15", "--key-file", str(key_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        banner = server.stdout.readline()
        assert "cecollm cloud" in banner, server.stderr.read()
        policy = ExitPolicy(exits=(6, 10), split=15, thresholds=(1.1,))
        t0 = time.perf_counter()
        result = generate_collab(model, "The capital of France is", policy,
                                 lambda: TcpLink(cloud_ip, 7433, key=b"netem-test-key"), max_new_tokens=12,
                                 dtype="f32", deadline_s=5.0)  # fmt: skip
        elapsed = time.perf_counter() - t0
        assert result.tokens == model.generate("The capital of France is", max_new_tokens=12).tokens
        assert {t.source for t in result.extra["traces"]} == {"cloud"}
        # every cloud-assisted token waited at least one shaped round trip
        assert elapsed >= 12 * 2 * DELAY_MS / 1000
    finally:
        server.terminate()
        server.communicate(timeout=30)  # reaps it and closes its pipes
