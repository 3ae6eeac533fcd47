"""Decode sharded across two processes joined by jax.distributed (loopback, CPU devices)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_decode_their_shards_like_one_process():
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(WORKER.parent))
    workers = [subprocess.Popen([sys.executable, str(WORKER), coordinator, str(rank)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for rank in range(2)]
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            pytest.fail("a worker did not finish within 240 s")
    for rank, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"process {rank} failed:\n{output[-4000:]}"
        assert f"process {rank}: ok" in output
