"""Two hosts for real: two network namespaces on this machine, joined by a veth pair, each its own
network stack with its own address, one training process in each. torchrun rendezvouses over
the pair (`--nnodes 2 --node_rank R --master_addr <host A>`), gloo carries the gradients over it,
and the losses must be those of one host running both processes.

Needs root and iproute2 (`ip netns`); skipped with the reason otherwise. The namespaces and the
pair are removed whatever happens.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from contextlib import ExitStack, contextmanager

import pytest

from conftest import step_losses
from test_distributed import write_job
from torchrun import torchrun_train

SUBNET = "10.231.{}.{}"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def two_hosts():
    """(host A, host B): (namespace, interface, address) each, joined by one veth pair."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`) to make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces")
    tag = os.getpid() % 250
    hosts = [
        (f"lf-host{h}-{os.getpid()}", f"lfv{h}{os.getpid()}"[:15], SUBNET.format(tag, h + 1)) for h in (0, 1)
    ]
    made: list[str] = []
    try:
        try:
            for ns, _, _ in hosts:
                ip("netns", "add", ns)
                made.append(ns)
            (_, if_a, _), (_, if_b, _) = hosts
            ip("link", "add", if_a, "type", "veth", "peer", "name", if_b)
            for ns, dev, addr in hosts:
                ip("link", "set", dev, "netns", ns)
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as error:
            pytest.skip(f"cannot make network namespaces here: {error.stderr.strip()}")
        yield hosts
    finally:
        for ns in made:  # deleting a namespace removes its end of the pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_over_a_veth_pair_train_like_one_host(tmp_path, tiny_llama_dir):
    job = write_job(tmp_path, tiny_llama_dir)
    torchrun_train(job, "output.name=one-host", accelerate_use_cpu=True)
    with two_hosts() as hosts:
        master = hosts[0][2]
        port = str(free_port())
        procs = []
        with ExitStack() as files:
            for rank, (ns, dev, _) in enumerate(hosts):
                env = {
                    **os.environ,
                    "ACCELERATE_USE_CPU": "1",
                    "HF_HUB_OFFLINE": "1",
                    "OMP_NUM_THREADS": "1",
                    "GLOO_SOCKET_IFNAME": dev,  # gloo's traffic over the pair, not the namespace's loopback
                }
                cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run"]
                cmd += ["--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1"]
                cmd += ["--master_addr", master, "--master_port", port]
                cmd += ["-m", "llamaforge.cli", "train", str(job), "output.name=two-hosts"]
                log = files.enter_context(open(tmp_path / f"host{rank}.log", "w"))
                procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=log))
            try:
                codes = [p.wait(timeout=900) for p in procs]
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
        logs = [(tmp_path / f"host{r}.log").read_text()[-3000:] for r in (0, 1)]
        assert codes == [0, 0], logs
    got, want = step_losses(tmp_path / "runs" / "two-hosts"), step_losses(tmp_path / "runs" / "one-host")
    assert len(got) == len(want) == 10
    assert got == pytest.approx(want, rel=0, abs=1e-6)
