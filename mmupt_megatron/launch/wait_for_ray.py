"""Block until a Ray cluster reports at least N GPUs (or CPUs), then exit 0; exit 1 on timeout.

Run inside a Slurm job by the bootstrap that ``mmupt launch`` renders, on the head node:

    python -m mmupt_megatron.launch.wait_for_ray --address 10.0.0.1:6379 --gpus 32 --timeout 600
"""

from __future__ import annotations

import argparse
import sys
import time


def wait_for_resources(*, address: str, resource: str, count: float, timeout_s: float, poll_s: float = 5.0) -> bool:
    """True once ``ray.cluster_resources()[resource] >= count``; False after ``timeout_s``."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            have = ray.cluster_resources().get(resource, 0.0)
            print(f"wait_for_ray: {have:g}/{count:g} {resource} in the cluster at {address}", flush=True)
            if have >= count:
                return True
        except ConnectionError as error:  # the head is not up yet
            print(f"wait_for_ray: cannot reach {address} yet ({error})", flush=True)
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="HOST:PORT of the Ray head")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs to wait for")
    parser.add_argument("--cpus", type=float, default=0, help="CPUs to wait for (when --gpus is 0)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before giving up")
    args = parser.parse_args(argv)
    resource, count = ("GPU", args.gpus) if args.gpus else ("CPU", args.cpus)
    ok = wait_for_resources(address=args.address, resource=resource, count=count, timeout_s=args.timeout)
    try:
        import ray

        ray.shutdown()
    finally:
        if not ok:
            print(f"wait_for_ray: timed out after {args.timeout:g} s waiting for {count:g} {resource}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
