"""Peak extra memory of token log-probs: ours (chunked) vs ``log_softmax().gather()``.

    .venv/bin/python benchmarks/logprob_memory.py [--vocab 151936] [--seq 4096]

Each method runs in a fresh subprocess: it allocates the fp32 logits [seq, vocab] (Qwen2.5's vocabulary),
reads the process's peak RSS, computes the log-probs of random targets (forward, as for old/reference
log-probs; and forward + backward), and reports how far the peak RSS rose above the logits alone.
Target: ours at most 10% of the logits tensor. With backward, both methods must also produce the gradient
of the logits (one logits-sized tensor); the rest is intermediate memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _worker(method: str, backward: bool, vocab: int, seq: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from mmupt_megatron.algorithms import token_logprobs

    torch.set_num_threads(1)
    logits = torch.randn(1, seq, vocab).requires_grad_(backward)
    targets = torch.randint(0, vocab, (1, seq))
    before = _peak_bytes()
    start = time.perf_counter()
    if method == "ours":
        out = token_logprobs(logits, targets)
    else:
        out = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    if backward:
        out.sum().backward()
    seconds = time.perf_counter() - start
    return {"extra": _peak_bytes() - before, "logits": logits.numel() * 4, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "BACKWARD"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], args.worker[1] == "1", args.vocab, args.seq)))
        return
    rows = []
    for backward in (False, True):
        for method in ("log_softmax+gather", "ours"):
            out = subprocess.run(
                [sys.executable, __file__, "--vocab", str(args.vocab), "--seq", str(args.seq),
                 "--worker", method, "1" if backward else "0"],
                capture_output=True, text=True, check=True,
            )
            rows.append((method, backward, json.loads(out.stdout.strip().splitlines()[-1])))
    logits_gib = rows[0][2]["logits"] / 2**30
    print(f"logits [{args.seq}, {args.vocab}] fp32 = {logits_gib:.2f} GiB; fwd+bwd includes its gradient (100%)\n")
    print("| method | pass | peak extra memory | % of logits | seconds |")
    print("|---|---|---|---|---|")
    for method, backward, r in rows:
        print(
            f"| {method} | {'fwd+bwd' if backward else 'forward'} | {r['extra'] / 2**20:,.0f} MiB "
            f"| {100 * r['extra'] / r['logits']:.1f}% | {r['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
