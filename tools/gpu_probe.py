"""Helpers of the offline GPU probe (``scripts/gpu_wheels.sh``, ``scripts/gpu_check.sh``). Standard library only
at import: it runs under the node's own Python before anything is installed.

    python tools/gpu_probe.py manifest DIR [--limit-mib 64] [--python-version 3.12] [--package-root ROOT]
        sizes and sha256 of DIR/*.whl -> DIR/manifest.txt (+ DIR/node-requirements.txt); fails over the limit,
        on two versions of one package, on wheels that would shadow the node's torch / CUDA / triton, and on a
        package wheel that lacks modules of the checkout
    python tools/gpu_probe.py verify DIR       the wheels still match DIR/manifest.txt (and the same rules)
    python tools/gpu_probe.py env --device cuda|cpu [--site DIR] [--json FILE]
        versions and environment: python, torch, CUDA, the device, free memory, what imports and from where
        (the wheels' site folder, the checkout or the node); non-zero exit when the policy tier cannot run
    python tools/gpu_probe.py summary OUT      OUT/stages.tsv (+ logs, memory trace, records) -> OUT/summary.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import zipfile
from pathlib import Path

FORBIDDEN = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch[-_]triton.*|nvidia[-_].*|cuda[-_].*)$")
"""Wheels that must never travel: they would shadow the node's own CUDA build of torch and its libraries."""

NODE_HAS = {  # what the offline GPU node's image already has (STACK.md "Found in 2026-12", device/KINDS.md)
    "numpy": "2.5.2", "packaging": "", "psutil": "", "einops": "", "pyyaml": "", "safetensors": "0.8.0",
    "tokenizers": "0.23.2", "transformers": "5.17.0", "huggingface-hub": "1.33.0", "pillow": "", "sympy": "",
    "tqdm": "", "pytest": "", "pytest-timeout": "",
}
"""Name -> the version seen there ("" where none was read); ``node-requirements.txt`` lists the names, the versions
as comments (a stand-in venv for a dry run installs the names at its own machine's versions: transformers 5.17,
say, needs the node's torchvision for the Qwen2-VL image processor, which a CPU machine cannot install)."""

REQUIRED = [
    "torch", "numpy", "packaging", "safetensors", "tokenizers", "transformers", "PIL", "yaml", "psutil",
    "megatron.core", "pytest",
    "mmupt_megatron", "mmupt_megatron.engines.megatron_policy", "mmupt_megatron.engines.device_transport",
    "mmupt_megatron.models.convert", "mmupt_megatron.trainer.workers", "mmupt_megatron.trainer.optim_checkpoint",
]
"""What the policy tier (tests/gpu) imports: one missing fails the env stage."""

OPTIONAL = ["omegaconf", "math_verify", "latex2sympy2_extended", "antlr4", "einops", "sympy", "pytest_timeout",
            "transformer_engine", "apex", "flash_attn", "vllm", "ray"]
"""Reported (version and origin, or why not), never a failure: TE/FP8 tests skip without TE, the engine tier
without vLLM and Ray."""

DIST_OF = {"PIL": "pillow", "yaml": "pyyaml", "megatron.core": "megatron-core", "mmupt_megatron": "mmupt-megatron",
           "antlr4": "antlr4-python3-runtime", "math_verify": "math-verify", "pytest_timeout": "pytest-timeout",
           "transformer_engine": "transformer-engine", "flash_attn": "flash-attn"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_name_version(path: Path) -> tuple[str, str]:
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise ValueError(f"{path.name}: not a wheel file name (name-version-python-abi-platform.whl)")
    return parts[0], parts[1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_problems(wheels: list[Path]) -> list[str]:
    problems, seen = [], {}
    for path in wheels:
        name, version = _wheel_name_version(path)
        key = _normalize(name)
        if FORBIDDEN.match(key):
            problems.append(f"{path.name}: {key} must not travel (it would shadow the node's own CUDA build)")
        if key in seen and seen[key] != version:
            problems.append(f"two versions of {key}: {seen[key]} and {version} (pip would refuse the install)")
        seen[key] = version
    return problems


def _package_gaps(wheel: Path, root: Path) -> list[str]:
    """Modules of the checkout's mmupt_megatron missing from the package's wheel."""
    with zipfile.ZipFile(wheel) as zf:
        packed = {n for n in zf.namelist() if n.startswith("mmupt_megatron/")}
    tree = {p.relative_to(root).as_posix() for p in (root / "mmupt_megatron").rglob("*.py") if "__pycache__" not in p.parts}
    return sorted(tree - packed)


def cmd_manifest(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    wheels = sorted(out.glob("*.whl"))
    if not wheels:
        print(f"gpu_probe manifest: no wheels in {out}", file=sys.stderr)
        return 1
    problems = _wheel_problems(wheels)
    rows = [(*_wheel_name_version(w), w.stat().st_size, _sha256(w), w.name) for w in wheels]
    total = sum(r[2] for r in rows)
    if total > args.limit_mib * (1 << 20):
        problems.append(f"{total / (1 << 20):.1f} MiB in all: over the {args.limit_mib} MiB that may travel")
    gaps: list[str] = []
    if args.package_root:
        ours = [w for w in wheels if _normalize(_wheel_name_version(w)[0]) == "mmupt-megatron"]
        if not ours:
            problems.append("no mmupt_megatron wheel")
        else:
            gaps = _package_gaps(ours[0], Path(args.package_root))
    lines = [f"# gpu_wheels manifest: Python {args.python_version}, written {time.strftime('%Y-%m-%d %H:%M:%S')}",
             "# name version bytes sha256 file"]
    lines += [f"{name} {version} {size} {sha} {file}" for name, version, size, sha, file in rows]
    lines.append(f"# total {total} bytes ({total / (1 << 20):.2f} MiB of {args.limit_mib} MiB), {len(rows)} wheels")
    if gaps:
        lines.append(f"# mmupt_megatron wheel lacks {len(gaps)} module(s) of the checkout: {' '.join(gaps)}")
    (out / "manifest.txt").write_text("\n".join(lines) + "\n")
    node = ["# What the GPU node is expected to have already (its own image); the wheels here add the rest.",
            "# The versions seen on the node are in the comments.",
            "# torch is not listed: the node's own CUDA build stays (a stand-in venv installs its own first)."]
    node += [f"{name:16s} # node: {version or 'present'}" for name, version in NODE_HAS.items()]
    (out / "node-requirements.txt").write_text("\n".join(node) + "\n")
    print("\n".join(lines))
    for problem in problems:
        print(f"gpu_probe manifest: {problem}", file=sys.stderr)
    if gaps:
        print(f"gpu_probe manifest: warning: the mmupt_megatron wheel lacks {gaps} (tests run against the wheel)",
              file=sys.stderr)
    return 1 if problems else 0


def cmd_verify(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    wheels = sorted(folder.glob("*.whl"))
    problems = _wheel_problems(wheels) if wheels else [f"no wheels in {folder}"]
    manifest = folder / "manifest.txt"
    listed = {}
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            if line and not line.startswith("#"):
                _, _, size, sha, file = line.split()
                listed[file] = (int(size), sha)
        for w in wheels:
            if w.name not in listed:
                problems.append(f"{w.name} is not in manifest.txt")
            elif (w.stat().st_size, _sha256(w)) != listed[w.name]:
                problems.append(f"{w.name} differs from manifest.txt (size or sha256): a broken transfer?")
        problems += [f"{f} (in manifest.txt) is missing" for f in listed if not (folder / f).exists()]
    total = sum(w.stat().st_size for w in wheels)
    for problem in problems:
        print(f"gpu_probe verify: {problem}", file=sys.stderr)
    checked = "sha256 checked against manifest.txt" if manifest.exists() else "no manifest.txt: sha256 not checked"
    print(f"RESULT: {len(wheels)} wheels, {total / (1 << 20):.2f} MiB, {checked}")
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------------- env
def _origin(path: str | None, site: str | None, root: Path) -> str:
    if not path:
        return "builtin"
    real = os.path.realpath(path)
    if site and real.startswith(os.path.realpath(site) + os.sep):
        return "wheels"
    if real.startswith(str(root) + os.sep) and not re.search(r"[/\\](site|dist)-packages[/\\]", real):
        return "checkout"
    return "node"  # the interpreter's own packages (a venv inside the checkout too)


def _probe_import(name: str, site: str | None, root: Path) -> dict:
    import importlib
    import importlib.metadata as md

    try:
        module = importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - ImportError, RuntimeError (TE without cuDNN), SystemExit ...
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
    version = getattr(module, "__version__", None)
    if not isinstance(version, str):
        try:
            version = md.version(DIST_OF.get(name, name.split(".")[0]))
        except md.PackageNotFoundError:
            version = ""
    return {"ok": True, "version": version, "origin": _origin(getattr(module, "__file__", None), site, root)}


def cmd_env(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    root = Path(__file__).resolve().parents[1]
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "device": args.device,
                  "site": args.site, "checkout": str(root),
                  "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "PYTHONPATH", "OMP_NUM_THREADS",
                                                         "MMUPT_GPU_SUITE_DEVICE", "HF_HUB_OFFLINE")}}
    problems = []
    try:
        import torch
    except BaseException as exc:  # noqa: BLE001
        print(f"RESULT: torch does not import: {type(exc).__name__}: {exc}")
        return 1
    info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "file": torch.__file__,
                     "origin": _origin(torch.__file__, args.site, root), "cuda_available": torch.cuda.is_available()}
    if info["torch"]["origin"] == "wheels":
        problems.append("torch was imported from the wheels' folder, not the node's own")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info["gpu"] = {"count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(),
                       "capability": ".".join(map(str, torch.cuda.get_device_capability())),
                       "free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2),
                       "bf16": torch.cuda.is_bf16_supported(), "nccl": torch.distributed.is_nccl_available()}
    elif args.device == "cuda":
        problems.append(f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda})")
    info["imports"] = {name: _probe_import(name, args.site, root) for name in REQUIRED + OPTIONAL}
    missing = [name for name in REQUIRED if not info["imports"][name]["ok"]]
    problems += [f"{name} does not import: {info['imports'][name]['error']}" for name in missing]
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    print(f"python {info['python']} ({sys.executable})")
    t = info["torch"]
    print(f"torch {t['version']} (CUDA {t['cuda']}), from {t['origin']}: {t['file']}")
    if "gpu" in info:
        g = info["gpu"]
        print(f"GPU: {g['count']} x {g['name']} (sm {g['capability']}), {g['free_gib']} of {g['total_gib']} GiB free")
    for name in REQUIRED + OPTIONAL:
        r = info["imports"][name]
        tag = "required" if name in REQUIRED else "optional"
        print(f"  {name:45s} {tag:8s} " + (f"{r['version'] or '?':14s} {r['origin']}" if r["ok"] else f"NO  {r['error']}"))
    for problem in problems:
        print(f"gpu_check env: {problem}")
    imp = info["imports"]
    short = (f"torch {t['version']}" + (f", {info['gpu']['name']} {info['gpu']['free_gib']}/{info['gpu']['total_gib']} GiB free"
                                        if "gpu" in info else ", no GPU")
             + f"; megatron-core {imp['megatron.core'].get('version', 'NO')} ({imp['megatron.core'].get('origin', '-')})"
             + f"; mmupt_megatron from {imp['mmupt_megatron'].get('origin', 'NO')}"
             + f"; TE {'yes' if imp['transformer_engine']['ok'] else 'no'}"
             + f"; vllm/ray {'yes' if imp['vllm']['ok'] and imp['ray']['ok'] else 'no'}")
    print(f"RESULT: {'; '.join(problems) if problems else short}")
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------------- summary
_PYTEST_TAIL = re.compile(r"^=*\s*((?:\d+ (?:passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)"
                          r"(?:, )?)+)(?: in [\d.]+s.*?)?\s*=*$")


def _one_line(log: Path) -> tuple[str, dict[str, int]]:
    """(the stage's one-line result, pytest's counts) from its log."""
    if not log.exists():
        return "", {}
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    counts: dict[str, int] = {}
    result = ""
    for line in reversed(lines):
        match = _PYTEST_TAIL.match(line)
        if match:
            for number, word in re.findall(r"(\d+) (\w+)", match.group(1)):
                counts[word.rstrip("s") if word in ("errors", "warnings") else word] = int(number)
            result = match.group(1)
            break
    failed = [line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR ")) and len(line.split()) > 1]
    if failed:
        result += " - " + ", ".join(name.split("::")[-1] for name in failed[:3]) + (" ..." if len(failed) > 3 else "")
    if not result:
        tagged = [line for line in lines if line.startswith("RESULT: ")]
        result = tagged[-1][len("RESULT: "):] if tagged else (lines[-1] if lines else "")
    return result[:160], counts


def _trace_peaks(out: Path, stages: list[dict]) -> dict[str, str]:
    """Peak GPU memory used (MiB, nvidia-smi) during each stage, from OUT/memory_trace.csv."""
    trace = out / "memory_trace.csv"
    if not trace.exists():
        return {}
    samples = []
    for line in trace.read_text(errors="replace").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            continue
        try:
            stamp = time.mktime(time.strptime(fields[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
            stamp += float("0." + fields[0].split(".")[1]) if "." in fields[0] else 0.0
            samples.append((stamp, float(fields[2]), float(fields[3])))
        except (ValueError, IndexError):
            continue
    peaks = {}
    for stage in stages:
        if stage["status"] == "skip":
            continue
        inside = [used for stamp, used, _ in samples if stage["start"] - 0.5 <= stamp <= stage["end"] + 0.5]
        if inside:
            peaks[stage["name"]] = f"{max(inside):.0f}"
    if samples:
        peaks["_all"] = f"{max(s[1] for s in samples):.0f} of {samples[0][2]:.0f} MiB, {len(samples)} samples"
    return peaks


def cmd_summary(args: argparse.Namespace) -> int:
    out = Path(args.out)
    stages = []
    for line in (out / "stages.tsv").read_text().splitlines():
        name, status, seconds, start, end, rc, note = (line.split("\t") + [""] * 7)[:7]
        stages.append({"name": name, "status": status, "seconds": float(seconds or 0), "start": float(start or 0),
                       "end": float(end or 0), "rc": rc, "note": note})
    peaks = _trace_peaks(out, stages)
    rows = []
    for stage in stages:
        result, counts = _one_line(out / "logs" / f"{stage['name']}.log")
        status = stage["status"]
        if status == "pass" and counts and not counts.get("passed") and counts.get("skipped"):
            status = "skip"  # pytest exits 0 when every test was skipped: nothing was checked
        if stage["note"]:
            result = stage["note"] + (f" ({result})" if result and status != "skip" else "")
        if stage["name"] in peaks:
            result += f" [peak {peaks[stage['name']]} MiB]"
        rows.append((stage["name"], status, f"{stage['seconds']:.1f}", result))
    width = max(len(r[0]) for r in rows) if rows else 5
    lines = [f"{'stage':{width}s}  {'status':7s}  {'seconds':>7s}  result", "-" * (width + 30)]
    lines += [f"{name:{width}s}  {status:7s}  {secs:>7s}  {result}" for name, status, secs, result in rows]
    total = sum(s["seconds"] for s in stages)
    bad = [r[0] for r in rows if r[1] in ("FAIL", "TIMEOUT")]
    lines.append("-" * (width + 30))
    lines.append(f"{'total':{width}s}  {'FAIL' if bad else 'pass':7s}  {total:7.1f}  "
                 + (f"failed: {', '.join(bad)}" if bad else "no stage failed"))
    if "_all" in peaks:
        lines.append(f"GPU memory used (nvidia-smi, every 0.5 s): peak {peaks['_all']}: memory_trace.csv")
    record = out / "probe_record.jsonl"
    if record.exists():
        lines.append(f"measured figures (one JSON line per test): {record.name}")
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    (out / "summary.tsv").write_text("".join(f"{n}\t{s}\t{sec}\t{r}\n" for n, s, sec, r in rows))
    print(text, end="")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("manifest")
    p.add_argument("dir")
    p.add_argument("--limit-mib", type=float, default=64)
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--package-root")
    p.set_defaults(fn=cmd_manifest)
    p = sub.add_parser("verify")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("env")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--site")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_env)
    p = sub.add_parser("summary")
    p.add_argument("out")
    p.set_defaults(fn=cmd_summary)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
