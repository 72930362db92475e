"""MilvusLiteServer refuses a port it does not own (no milvus-lite is started here)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from cluster.errors import ConfigError
from cluster.milvus_server import PID_FILE, MilvusLiteServer


@pytest.fixture
def foreign_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_foreign_listener_on_the_port_is_refused(tmp_path, foreign_listener):
    with pytest.raises(ConfigError, match=f"port {foreign_listener} .* not the milvus-lite server"):
        MilvusLiteServer(tmp_path, port=foreign_listener).start()


def test_a_pid_file_naming_a_non_milvus_process_is_not_trusted(tmp_path, foreign_listener):
    # This test process listens on the port, and the pid file names it: still not a milvus-lite
    # server of this data dir, so it must not be reused.
    (tmp_path / PID_FILE).write_text(json.dumps({"pid": os.getpid(), "port": foreign_listener}))
    server = MilvusLiteServer(tmp_path, port=foreign_listener)
    assert server._owner_pid() is None
    with pytest.raises(ConfigError):
        server.start()


def test_stop_without_start_is_harmless(tmp_path):
    MilvusLiteServer(tmp_path, port=1).stop()
