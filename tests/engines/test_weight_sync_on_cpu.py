"""Refit Megatron -> vLLM on CPU: 2 gloo workers (TP=2, then PP=2) take a GRPO step on a tiny Qwen2.5-VL
and stream their weights in buckets through pipes (TP=2) or shared memory (PP=2) into a vLLM engine
running in this (pytest) process, which loads views of the reused transport buffers; vLLM's log-probs
then equal the policy's. Also: tiny buckets, manifest == stream, bad mappings refused before the engine
is touched, verify_refit, transports reusing their buffers."""

from __future__ import annotations

import os
import re
import threading

import pytest
import torch
from safetensors.torch import load_file

from mmupt_megatron.engines.rollout import RolloutRequest
from mmupt_megatron.engines.weight_sync import (
    RefitMismatchError,
    completion_logprobs,
    load_refit,
    plan_buckets,
    verify_refit,
)
from mmupt_megatron.engines.weight_transport import ManifestEntry, PipeReceiver
from tests.tiny_models import make_tiny_qwen2_5_vl
from tests.models.tiny_inputs import image_prompt_batch

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"
TEXT_PROMPT = "<|im_start|>user\nHow many sides?<|im_end|>\n<|im_start|>assistant\n"
COMPLETIONS = [[17, 42, 99, 123, 7], [55, 66, 77]]
# (session, layout (tp, pp, dp), optimizer, bucket_bytes or a bad-mapping kind); the workers and the
# parent walk this list in the same order.
SMALL = 4096  # smaller than most tensors here (the largest, lm_head / embedding, is 400*128*4 = 200 KiB)
SESSIONS = (
    ("tp2", (2, 1, 1), "sgd", 256 << 20),
    ("tp2-small", (2, 1, 1), "sgd", SMALL),
    ("tp2-shm", (2, 1, 1), "sgd", 64 << 10),
    ("bad-name", (2, 1, 1), "sgd", "name"),
    ("bad-shape", (2, 1, 1), "sgd", "shape"),
    ("dropped", (2, 1, 1), "sgd", "drop"),
    ("pp2", (1, 2, 1), "adam", 64 << 10),
)
STAGE_RANKS = {(2, 1, 1): [0], (1, 2, 1): [0, 1]}


def bad_mapping(kind: str):
    from mmupt_megatron.models import mapping as M

    original = M.megatron_layer_to_hf

    def patched(shards, **kwargs):
        out = original(shards, **kwargs)
        if kind == "name":
            out["mlp.upp_proj.weight"] = out.pop("mlp.up_proj.weight")
        elif kind == "shape":
            out["mlp.down_proj.weight"] = out["mlp.down_proj.weight"].t().contiguous()
        else:
            out.pop("self_attn.o_proj.weight")
        return out

    return patched


def refit_worker(hf_dir: str, data: dict, conns: list) -> dict:
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel
    from mmupt_megatron.engines.weight_sync import send_refit
    from mmupt_megatron.engines.weight_transport import PipeSender, ShmSender
    from mmupt_megatron.models import mapping as M
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    conn = conns[int(os.environ["RANK"])]
    arch = load_arch(hf_dir)
    results: dict = {}
    policy = groups = None
    for name, layout, optimizer, how in SESSIONS:
        if policy is None or layout != (groups.dims.tp, groups.dims.pp, groups.dims.dp):
            groups = init_parallel(ParallelDims(tp=layout[0], pp=layout[1], dp=layout[2]))
            model = Qwen2_5_VLModel(arch, groups, init_weights=False)
            load_hf_weights(model, hf_dir)
            cfg = PolicyOptimConfig(lr=0.5 if optimizer == "sgd" else 1e-2, optimizer=optimizer, grad_clip=1.0,
                                    weight_decay=0.0, adam_eps=1e-3)
            policy = MegatronPolicy(model, groups, cfg)
            batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"],
                                loss_mask_BT=data["loss_mask"], advantages_B=torch.tensor([1.0, -1.0]),
                                pixel_values=data["pixels"], image_grid_thw=data["grid"])
            before = policy.compute_logprobs(batch)
            batch.old_logprobs_BT = before - 0.05 if before is not None else torch.zeros_like(data["loss_mask"])
            policy.train_step(batch)
            results[layout] = {"logprobs": policy.compute_logprobs(batch)}
        # shared memory: at TP=2 both ranks write their pieces into the bucket (no gather); pipes: TP gather
        transport = ShmSender if name in ("tp2-shm", "pp2") else PipeSender
        sender = transport(conn) if groups.tp_rank == 0 else None
        if isinstance(how, int):
            stats = send_refit(model, sender, bucket_bytes=how)
            results[name] = {"plan": stats.plan, "bytes": stats.num_bytes, "shared": stats.num_shared_buckets}
            continue
        original = M.megatron_layer_to_hf
        M.megatron_layer_to_hf = bad_mapping(how)
        try:
            send_refit(model, sender, bucket_bytes=256 << 20)
            results[name] = {"refusal": None}
        except ValueError as exc:
            results[name] = {"refusal": str(exc)}
        finally:
            M.megatron_layer_to_hf = original
    return results


class RecordingEngine:
    """The engine, recording what each refit loaded (tests re-load it later)."""

    def __init__(self, engine) -> None:
        self.engine, self.loaded, self.calls = engine, {}, 0
        self.expected_shapes = engine.expected_shapes

    def check_manifest(self, manifest) -> None:
        self.engine.check_manifest(manifest)

    def load_weights(self, weights, *, manifest=None) -> int:
        weights = list(weights)
        self.calls += 1
        self.loaded.update({name: tensor.clone() for name, tensor in weights})
        return self.engine.load_weights(weights, manifest=manifest)


def probe_batch(hf_dir, tmp_path) -> tuple[dict, list[RolloutRequest]]:
    from PIL import Image
    from transformers import AutoTokenizer

    ids_a, pixels, grid = image_prompt_batch(hf_dir, tmp_path / "a.png")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids_b = torch.tensor([tokenizer.encode(TEXT_PROMPT, add_special_tokens=False)])
    rows = [torch.cat([ids_a[0], torch.tensor(COMPLETIONS[0])]), torch.cat([ids_b[0], torch.tensor(COMPLETIONS[1])])]
    width = max(len(row) for row in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    attention = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    loss_mask = torch.zeros(2, width - 1)
    for b, completion in enumerate(COMPLETIONS):
        loss_mask[b, -len(completion):] = 1
    requests = [
        RolloutRequest(group_id="image", prompt=PROMPT.format(q="What is the answer?"),
                       images=[Image.open(tmp_path / "a.png").convert("RGB")]),
        RolloutRequest(group_id="text", prompt=TEXT_PROMPT),
    ]
    return {"ids": ids, "attention": attention, "loss_mask": loss_mask, "pixels": pixels, "grid": grid}, requests


@pytest.fixture(scope="module")
def refits(tmp_path_factory):
    from mmupt_megatron.distributed.parallel import run_workers
    from mmupt_megatron.engines.vllm_rollout import VLLMRolloutEngine

    root = tmp_path_factory.mktemp("refit")
    hf_dir = make_tiny_qwen2_5_vl(root / "hf", seed=7)
    data, requests = probe_batch(hf_dir, root)
    raw = VLLMRolloutEngine(hf_dir, max_model_len=256, cpu_kvcache_gib=0.5, seed=0)
    original = load_file(str(hf_dir / "model.safetensors"))
    before = raw.prompt_logprobs(requests, COMPLETIONS)

    ctx = torch.multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe(duplex=True) for _ in range(2)]
    outcome: dict = {}

    def workers() -> None:
        try:
            outcome["ranks"] = run_workers(refit_worker, world_size=2, args=(str(hf_dir), data, [p[1] for p in pipes]))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test process below
            outcome["error"] = exc

    thread = threading.Thread(target=workers, daemon=True)
    thread.start()
    received: dict = {}
    for name, layout, _, how in SESSIONS:
        engine = RecordingEngine(raw)
        receivers = [PipeReceiver(pipes[rank][0], timeout_s=240, reuse_buffers=True) for rank in STAGE_RANKS[layout]]
        try:
            stats = load_refit(engine, receivers)
            received[name] = {"stats": stats, "logprobs": raw.prompt_logprobs(requests, COMPLETIONS),
                              "weights": engine.loaded, "calls": engine.calls}
            raw.load_weights(original.items())  # back to the checkpoint for the next session
        except (ValueError, TimeoutError) as exc:
            if "error" in outcome:
                raise RuntimeError("worker failure") from outcome["error"]
            received[name] = {"error": str(exc), "calls": engine.calls,
                              "logprobs": raw.prompt_logprobs(requests, COMPLETIONS)}
    thread.join(timeout=300)
    if "error" in outcome:
        raise outcome["error"]
    ranks = outcome["ranks"]
    yield {"engine": raw, "requests": requests, "before": before, "received": received, "ranks": ranks,
           "original": original, "data": data}
    raw.close()


def policy_logprobs(refits, layout) -> list[torch.Tensor]:
    last = next(r[layout]["logprobs"] for r in refits["ranks"] if r[layout]["logprobs"] is not None)
    return completion_logprobs(last, [len(c) for c in COMPLETIONS])


@pytest.mark.distributed
@pytest.mark.parametrize(("session", "layout"), [("tp2", (2, 1, 1)), ("tp2-small", (2, 1, 1)), ("tp2-shm", (2, 1, 1)),
                                                 ("pp2", (1, 2, 1))])
def test_refit_makes_vllm_match_the_stepped_policy(refits, session, layout):
    policy = policy_logprobs(refits, layout)
    engine = refits["received"][session]["logprobs"]
    for b, (mine, theirs, old) in enumerate(zip(engine, policy, refits["before"], strict=True)):
        assert (mine - theirs).abs().max() < 1e-4, (session, b, mine, theirs)
        assert (mine - old).abs().max() > 1e-3, (session, b)  # the step moved them: a no-op refit would fail
    # the Adam (pp2) and SGD (tp2) steps differ, so the pp2 refit cannot pass on the tp2 weights
    assert (policy_logprobs(refits, (1, 2, 1))[0] - policy_logprobs(refits, (2, 1, 1))[0]).abs().max() > 1e-3


@pytest.mark.distributed
def test_buckets_whole_layers_and_manifest_equals_stream(refits):
    received, ranks = refits["received"], refits["ranks"]
    shapes = refits["engine"].expected_shapes
    for session, layout in (("tp2", (2, 1, 1)), ("tp2-small", (2, 1, 1)), ("tp2-shm", (2, 1, 1)), ("pp2", (1, 2, 1))):
        stats = received[session]["stats"]
        plans = [ranks[rank][session]["plan"] for rank in STAGE_RANKS[layout]]
        planned = [[e.name for e in bucket.entries] for plan in plans for bucket in plan]
        assert stats.bucket_names == planned, session  # the manifest/plan is exactly what was streamed
        assert received[session]["calls"] == len(planned)  # one engine.load_weights per bucket
        names = [n for bucket in planned for n in bucket]
        assert sorted(names) == sorted(shapes), session  # everything, vision included, once
        assert all(tuple(received[session]["weights"][n].shape) == shapes[n] for n in names)
        for bucket in planned:  # whole layers: a layer's tensors never straddle buckets
            units = {re.match(r"(model\.layers\.\d+\.|visual\.blocks\.\d+\.)", n) for n in bucket} - {None}
            for unit in {m.group(1) for m in units}:
                assert sum(n.startswith(unit) for n in bucket) == 12, unit  # 12 per decoder layer and per vision block
    assert len(planned) > 1 and received["pp2"]["stats"].num_buckets > 2
    assert received["tp2"]["stats"].num_buckets == 1
    small = ranks[0]["tp2-small"]["plan"]
    # embedding, patch_embed, 2 vision blocks, merger, 2 decoder layers, final norm, lm_head: all apart
    assert [b.groups for b in small] == [(g,) for b in ranks[0]["tp2"]["plan"] for g in b.groups]
    assert len(small) == 9 and max(b.nbytes for b in small) > 100 * SMALL
    assert all(b.nbytes <= SMALL or len(b.groups) == 1 for b in small)
    assert ranks[1]["tp2"]["plan"] == [] or ranks[1]["tp2"]["bytes"] == 0  # TP rank 1 sends nothing
    # shared memory at TP=2: every bucket filled in place by both ranks; pipes: gathered over gloo
    assert all(r["tp2-shm"]["shared"] == len(r["tp2-shm"]["plan"]) > 1 for r in ranks)
    assert all(r["tp2"]["shared"] == 0 for r in ranks)


def test_plan_buckets_is_greedy_and_keeps_groups_whole():
    grouped = [(f"g{i}", [ManifestEntry(f"g{i}.w", (n,), "F32")]) for i, n in enumerate([10, 10, 100, 5, 5, 5])]
    plan = plan_buckets(grouped, bucket_bytes=80)
    assert [b.groups for b in plan] == [("g0", "g1"), ("g2",), ("g3", "g4", "g5")]
    assert [b.nbytes for b in plan] == [80, 400, 60] and plan[0].offsets == (0, 40)
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(grouped, bucket_bytes=0)


@pytest.mark.distributed
@pytest.mark.parametrize(("session", "message"), [
    ("bad-name", r"'model\.layers\.0\.mlp\.upp_proj\.weight' is not a parameter"),
    ("bad-shape", r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(256, 128\), the engine expects \(128, 256\)"),
    ("dropped", r"would not be updated, e\.g\. \['model\.layers\.0\.self_attn\.o_proj\.weight'"),
])
def test_bad_mapping_is_refused_before_the_engine_is_touched(refits, session, message):
    got = refits["received"][session]
    assert re.search(message, got["error"]), got["error"]
    assert got["calls"] == 0  # no bucket reached the engine
    assert all(torch.equal(a, b) for a, b in zip(got["logprobs"], refits["before"]))
    for rank in refits["ranks"]:  # both TP ranks of the stage raised, with the receiver's reason
        assert re.search(message, rank[session]["refusal"])


@pytest.mark.distributed
def test_verify_refit_passes_on_exact_refit_and_names_the_stale_sample(refits):
    engine, requests = refits["engine"], refits["requests"]
    policy = policy_logprobs(refits, (2, 1, 1))
    engine.load_weights(refits["received"]["tp2"]["weights"].items())
    assert verify_refit(engine, requests, COMPLETIONS, policy, tol=1e-3) < 1e-4
    engine.load_weights(refits["original"].items())  # stale: the pre-step weights
    with pytest.raises(RefitMismatchError, match=r"at sample \d \(group '(image|text)'\), completion token \d"):
        verify_refit(engine, requests, COMPLETIONS, policy, tol=1e-3)
    with pytest.raises(ValueError, match="tol"):
        verify_refit(engine, requests, COMPLETIONS, policy, tol=0)


def test_the_default_refit_tolerance_follows_the_policy_dtype():
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.engines.weight_sync import refit_tolerance

    # fp32 stacks agree to ~1e-5; bf16 rounding differs by tenths of a nat at single tokens (REFIT_TOL's note)
    assert refit_tolerance(torch.float32) == 1e-3 and refit_tolerance(torch.bfloat16) == 0.5
    assert load_config("demo").rollout.verify_refit_tol == 0  # 0 = by dtype (trainer.loop._verify_refit)


def _transport_sender(kind: str, conn, grouped, tensors, *, refits: int = 1, num_buffers: int = 1,
                      seen: list | None = None) -> None:
    from mmupt_megatron.engines.weight_transport import PipeSender, ShmSender

    sender = ShmSender(conn, num_buffers=num_buffers) if kind == "shm" else PipeSender(conn)
    for refit in range(refits):
        assert sender.offer([e for _, group in grouped for e in group]) is None
        for layout in plan_buckets(grouped, bucket_bytes=64):
            data = sender.buffer(layout)
            for entry, offset in zip(layout.entries, layout.offsets):
                data[offset : offset + entry.nbytes].copy_((tensors[entry.name] + refit).reshape(-1).view(torch.uint8))
            del data
            sender.send(layout)
            if seen is not None and kind == "shm":
                seen.append(tuple(sender.segments))
        sender.close()
    if kind == "shm":
        names = sender.segments
        sender.release()
        assert names and not any(os.path.exists(f"/dev/shm/{name}") for name in names)


def _transport_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"z.w": torch.randn(3, 5, generator=gen), "a.b": torch.randn(7, generator=gen),
            "m.bf": torch.randn(4, 2, generator=gen).bfloat16(), "q.big": torch.randn(40, generator=gen)}


@pytest.mark.parametrize("kind", ["pipe", "shm"])
def test_transports_carry_safetensors_frames_in_order(kind):
    from multiprocessing import Pipe

    from safetensors.torch import load as st_load

    from mmupt_megatron.engines.weight_transport import SafetensorsBuckets, decode_bucket

    tensors = _transport_tensors()
    grouped = [(name, [ManifestEntry.of(name, t)]) for name, t in tensors.items()]
    # a frame is valid safetensors and decodes to the same tensors, in the sender's order
    frames = SafetensorsBuckets()
    (layout,) = plan_buckets(grouped, bucket_bytes=1 << 20)
    data = frames.buffer(layout)
    for entry, offset in zip(layout.entries, layout.offsets):
        data[offset : offset + entry.nbytes].copy_(tensors[entry.name].reshape(-1).view(torch.uint8))
    blob = frames.take()
    assert all(torch.equal(st_load(bytes(blob))[n], t) for n, t in tensors.items())
    _, decoded = decode_bucket(blob)
    assert [n for n, _ in decoded] == list(tensors) and all(torch.equal(tensors[n], t) for n, t in decoded)
    # through a connection, several buckets (the 160-byte tensor alone in one)
    ours, theirs = Pipe(duplex=True)
    thread = threading.Thread(target=_transport_sender, args=(kind, theirs, grouped, tensors))
    thread.start()
    receiver = PipeReceiver(ours, timeout_s=30)
    assert [e.name for e in receiver.manifest()] == list(tensors)
    receiver.answer(None)
    got = list(receiver.buckets())  # without reuse_buffers, every bucket's tensors are its own
    thread.join(timeout=30)
    assert [[e.name for e in entries] for entries, _ in got] == [["z.w"], ["a.b", "m.bf"], ["q.big"]]
    assert all(torch.equal(tensors[n], t) for _, pairs in got for n, t in pairs)


@pytest.mark.parametrize(("kind", "num_buffers"), [("pipe", 1), ("shm", 1), ("shm", 2)])
def test_reused_buffers_across_buckets_and_refits(kind, num_buffers):
    """Senders reuse their buffers (one shared-memory segment per ring slot, grown to the largest bucket,
    kept from one refit to the next); a ``reuse_buffers`` receiver hands out views that stay valid until
    the next bucket is requested."""
    from multiprocessing import Pipe

    tensors = _transport_tensors()
    grouped = [(name, [ManifestEntry.of(name, t)]) for name, t in tensors.items()]
    ours, theirs = Pipe(duplex=True)
    seen: list = []
    thread = threading.Thread(target=_transport_sender, args=(kind, theirs, grouped, tensors),
                              kwargs={"refits": 2, "num_buffers": num_buffers, "seen": seen})
    thread.start()
    receiver = PipeReceiver(ours, timeout_s=30, reuse_buffers=True)
    for refit in range(2):
        receiver.manifest()
        receiver.answer(None)
        names = []
        for entries, pairs in receiver.buckets():
            for name, tensor in pairs:  # checked before asking for the next bucket
                assert torch.equal(tensor, tensors[name] + refit), (refit, name)
            names.append([e.name for e in entries])
        assert names == [["z.w"], ["a.b", "m.bf"], ["q.big"]]
    thread.join(timeout=30)
    assert not thread.is_alive()
    if kind == "shm":  # slots grow (to 1 MiB multiples) in the first refit; the second reuses them all
        assert len(seen[2]) == num_buffers and all(names == seen[2] for names in seen[3:])
