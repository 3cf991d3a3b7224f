"""Peer process plumbing: readiness wait, process-group stop, failure with the log tail."""

import sys

import pytest

from benchmarks.peers import PEERS, peer_module
from benchmarks.peers.base import PeerUnavailable, free_port, http_ok, launch

# A server that answers 200 to every GET and forks a child, to check the whole group is stopped.
TINY_SERVER = """
import http.server, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_launch_waits_until_ready_and_stop_ends_the_group() -> None:
    port = free_port()
    handle = launch(
        "tiny", [sys.executable, "-c", TINY_SERVER, str(port)], port=port, model="m", timeout_s=30
    )
    try:
        assert handle.is_alive() and http_ok(handle.base_url + "/health")
        assert handle.settings["startup_s"] >= 0
    finally:
        handle.stop(timeout_s=5)
    assert not handle.is_alive()
    assert not http_ok(handle.base_url + "/health", timeout_s=0.5)


def test_launch_reports_an_early_exit_with_the_log() -> None:
    port = free_port()
    command = [sys.executable, "-c", "import sys; print('boom: no model here'); sys.exit(3)"]
    with pytest.raises(PeerUnavailable, match="exited with code 3") as raised:
        launch("broken", command, port=port, model="m", timeout_s=30)
    assert "boom: no model here" in str(raised.value)


def test_registry_lists_every_peer_module() -> None:
    for name in PEERS:
        module = peer_module(name)
        assert module.NAME == name
        assert callable(module.install) and callable(module.start) and callable(module.is_installed)
    with pytest.raises(KeyError, match="known: ours"):
        peer_module("tgi")
