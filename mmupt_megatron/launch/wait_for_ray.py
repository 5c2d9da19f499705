"""Block until a Ray cluster has N alive nodes and G GPUs, then exit 0; exit 1 at the deadline.

Run inside a Slurm job by the bootstrap that ``mmupt launch`` renders, on the head node:

    python -m mmupt_megatron.launch.wait_for_ray --address 10.0.0.1:6379 --nodes 4 --gpus 32 --timeout 600

``--timeout`` is a real deadline: the head's port is probed with a bounded connect before ``ray.init`` is
tried, and a ``ray.init`` that hangs (a head that accepts but never answers, a wrong auth token) is abandoned
when the deadline passes (the process then exits without waiting for it).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time


def _port_open(address: str, timeout_s: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=max(0.1, timeout_s)):
            return True
    except (OSError, ValueError):
        return False


def _count(address: str) -> tuple[int, float]:
    """(alive nodes, GPUs) of the cluster at ``address``; connects on first use."""
    import ray

    from mmupt_megatron.trainer.cluster import connect_ray

    if not ray.is_initialized():
        connect_ray(address, log_to_driver=False, logging_level="ERROR")
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return nodes, ray.cluster_resources().get("GPU", 0.0)


def wait_for_cluster(*, address: str, nodes: int, gpus: float, timeout_s: float, poll_s: float = 2.0) -> bool:
    """True once the cluster has ``nodes`` alive nodes and ``gpus`` GPUs; False at ``timeout_s``.

    Each attempt runs in a daemon thread joined with the time left, so nothing blocks past the deadline."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not _port_open(address, min(2.0, left)):
            print(f"wait_for_ray: nothing listens at {address} yet", flush=True)
        else:
            result: dict[str, object] = {}

            def attempt(result: dict[str, object] = result) -> None:
                try:
                    result["value"] = _count(address)
                except Exception as error:  # noqa: BLE001 - the head may still be starting: report and retry
                    result["error"] = error

            worker = threading.Thread(target=attempt, daemon=True)
            worker.start()
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                print(f"wait_for_ray: connecting to {address} did not finish before the deadline", flush=True)
                return False
            if "error" in result:
                print(f"wait_for_ray: cannot use the cluster at {address} yet ({result['error']})", flush=True)
            else:
                have_nodes, have_gpus = result["value"]  # type: ignore[misc]
                print(f"wait_for_ray: {have_nodes}/{nodes} nodes, {have_gpus:g}/{gpus:g} GPUs at {address}", flush=True)
                if have_nodes >= nodes and have_gpus >= gpus:
                    return True
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="HOST:PORT of the Ray head")
    parser.add_argument("--nodes", type=int, default=1, help="alive nodes to wait for")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs to wait for")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before giving up")
    args = parser.parse_args(argv)
    ok = wait_for_cluster(address=args.address, nodes=args.nodes, gpus=args.gpus, timeout_s=args.timeout)
    if not ok:
        print(f"wait_for_ray: timed out after {args.timeout:g} s waiting for {args.nodes} nodes and {args.gpus:g} GPUs "
              f"at {args.address}", file=sys.stderr, flush=True)
        os._exit(1)  # a ray.init stuck in its thread must not hold the process
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
