"""Packed sequences (Megatron's thd format): the row layout and its padding rules, first-fit planning under the token
budget, packing and unpacking of per-token values, Megatron's own THD RoPE reading our per-token mrope positions, and
a whole policy step (images, the vision tower, the loss and its gradients) equal to the length-bucketed path (the
model through Megatron's own THD code, the attention kernel ``models/packed_attention.py``)."""

from __future__ import annotations

import pytest
import torch

from mmupt_megatron.distributed.parallel import run_workers
from mmupt_megatron.engines.micro_batching import MicroBatchLayout
from mmupt_megatron.engines.sequence_packing import (
    check_right_padded,
    make_pack,
    pack_values,
    plan_packs,
    unpack_logprobs,
)
from tests.engines.test_token_budget_on_cpu import tiny_step_inputs


def test_pack_slots_pad_each_sequence_and_the_row():
    pack = make_pack([5, 3, 6], sequence_multiple=2, pack_multiple=8)
    assert pack.offsets == (0, 6, 10, 16)  # 5 -> 6, 3 -> 4, 6 -> 6; the row 16 (a multiple of 8) as it is
    assert pack.cu_seqlens == [0, 6, 10, 16] and pack.total == 16 and pack.max_seqlen == 6
    tail = make_pack([5, 3], sequence_multiple=2, pack_multiple=16)
    assert tail.offsets == (0, 6, 16)  # the last slot takes the row's padding: cu_seqlens ends at the row's length
    assert make_pack([4, 1]).offsets == (0, 4, 5)
    with pytest.raises(ValueError, match="at least one sequence"):
        make_pack([])


def test_first_fit_plan_fills_rows_under_the_budget():
    lengths = [10, 3, 7, 3, 9, 2, 6]
    plan = plan_packs(lengths, max_tokens=20)
    assert sorted(i for row in plan for i in row) == list(range(7))  # every sample exactly once
    assert plan == [[0, 4], [2, 6, 1, 3], [5]]  # longest first, each into the first row it fits
    assert all(sum(lengths[i] for i in row) <= 20 for row in plan)
    rounded = plan_packs(lengths, max_tokens=20, sequence_multiple=4, pack_multiple=8)
    for row in rounded:
        assert make_pack([lengths[i] for i in row], sequence_multiple=4, pack_multiple=8).total <= 20
    # versus length buckets (count x longest): the same budget computes fewer tokens packed
    buckets = MicroBatchLayout(max_tokens=20).plan(lengths)
    assert sum(len(b) * max(lengths[i] for i in b) for b in buckets) == 43
    assert sum(make_pack([lengths[i] for i in row]).total for row in plan) == sum(lengths) == 40
    with pytest.raises(ValueError, match=r"trainer.max_tokens_per_micro_batch=9 is smaller than a sequence of 10 tokens "
                                         r"\(packed: 10 with its padding\); raise it to at least 10"):
        plan_packs(lengths, max_tokens=9)
    with pytest.raises(ValueError, match=r"a sequence of 9 tokens \(packed: 16 with its padding\)"):
        plan_packs([9], max_tokens=12, pack_multiple=8)


def test_padding_rules_follow_fp8_and_sequence_parallelism():
    """Each sequence's slot: a multiple of TP under sequence parallelism (the row is split over the TP ranks); the
    row: FP8's 16 x TP (blockwise: 128 x TP), as NeMo-RL pads THD rows for Transformer Engine."""
    from types import SimpleNamespace

    from mmupt_megatron.models.qwen2_5_vl import packed_sequence_multiple, sequence_multiple

    def rules(tp, sp, fp8, recipe="delayed"):
        config = SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=sp, fp8="hybrid" if fp8 else None,
                                 fp8_recipe=recipe)
        return sequence_multiple(config), packed_sequence_multiple(config)

    assert rules(2, False, False) == (1, 1)
    assert rules(2, True, False) == (2, 2)
    assert rules(4, True, True) == (64, 4) and rules(2, False, True) == (32, 1)
    assert rules(2, False, True, "blockwise") == (256, 1)


def test_layout_without_a_budget_packs_micro_batch_size_sequences_in_order():
    layout = MicroBatchLayout(micro_batch_size=3, packed=True, multiple=4)
    assert layout.plan([5, 1, 2, 7, 3]) == [[0, 1, 2], [3, 4]]
    assert layout.pack([5, 1, 2]).total == 8


def test_pack_and_unpack_round_trip_next_token_values():
    ids_BT = torch.tensor([[11, 12, 13, 14, 0], [21, 22, 0, 0, 0], [31, 32, 33, 34, 35]])
    lengths = [4, 2, 5]
    pack = make_pack(lengths, sequence_multiple=2, pack_multiple=4)
    row = pack_values(ids_BT, pack, fill=-1)
    assert row.tolist() == [[11, 12, 13, 14, 21, 22, 31, 32, 33, 34, 35, -1]]
    positions = pack_values(torch.arange(15).reshape(1, 3, 5).expand(3, 3, 5), pack)  # [3, B, T] -> [3, 1, total]
    assert positions.shape == (3, 1, 12) and positions[0, 0, 4:6].tolist() == [5, 6]

    # a next-token quantity of the row, computed as the policy does ([1, total - 1]), goes back to [B, T - 1]
    values = (row[:, :-1] * 100 + row[:, 1:]).float().requires_grad_()
    unpacked = unpack_logprobs(values, pack, width=5)
    expected = (ids_BT[:, :-1] * 100 + ids_BT[:, 1:]).float()
    valid = torch.tensor([[True] * 3 + [False], [True] + [False] * 3, [True] * 4])
    assert torch.equal(unpacked[valid], expected[valid]) and not unpacked[~valid].any()
    unpacked.sum().backward()  # each real pair once; pairs across a slot boundary get no gradient
    assert values.grad[0].tolist() == [1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="2 samples for a pack of 3"):
        pack_values(ids_BT[:2], pack)


def test_packing_refuses_left_padded_samples():
    check_right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    check_right_padded(None)
    with pytest.raises(ValueError, match=r"sequence packing needs right-padded samples .* samples \[1\]"):
        check_right_padded(torch.tensor([[1, 1, 0], [0, 1, 1]]))


def thd_rope_errors(group) -> list[float]:
    """Megatron's THD RoPE (``apply_rotary_pos_emb`` with ``cu_seqlens``) uses per-token frequencies only when they
    cover the whole row (``cu_seqlens[-1]`` = the row's length, which ``make_pack`` guarantees): then a packed row
    with mrope positions gets exactly the rotation each sequence gets on its own. Returns the largest difference per
    sequence."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, apply_rope_fusion=False)
    rope = MultimodalRotaryEmbedding(kv_channels=16, rotary_percent=1.0)
    lengths, width = [5, 3], 6
    gen = torch.Generator().manual_seed(0)
    positions_3BT = torch.randint(0, 9, (3, 2, width), generator=gen)  # image tokens: three different axes
    pack = make_pack(lengths, sequence_multiple=2, pack_multiple=4)  # slots 6 and 4 -> row of 12 (last slot 6)
    x_BTHD = torch.randn(2, width, 2, 16, generator=gen)
    separate = [apply_rotary_pos_emb(x_BTHD[b, :n, None], rope(positions_3BT[:, b : b + 1, :n], [2, 3, 3]), config)
                for b, n in enumerate(lengths)]  # [s, 1, heads, dim] each
    row_THD = pack_values(x_BTHD.permute(2, 3, 0, 1), pack).permute(2, 3, 0, 1)[0]  # [total, heads, dim]
    freqs = rope(pack_values(positions_3BT, pack, fill=1), [2, 3, 3])
    cu_seqlens = torch.tensor(pack.cu_seqlens, dtype=torch.int32)
    packed = apply_rotary_pos_emb(row_THD, freqs, config, cu_seqlens=cu_seqlens, cp_group=group)
    assert packed.shape == row_THD.shape
    return [float((packed[pack.offsets[b] : pack.offsets[b] + n] - separate[b][:, 0]).abs().max())
            for b, n in enumerate(lengths)]


def packing_worker(hf_dir: str, data: dict) -> dict:
    from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights
    from mmupt_megatron.trainer.batching import pack_rollouts

    arch = load_arch(hf_dir)
    groups = init_parallel(ParallelDims())
    out = {"rope_errors": thd_rope_errors(groups.megatron_pgs.cp)}
    for packed in (False, True):
        batch = pack_rollouts(data["rollouts"], pad_id=0, images=data["images"], advantages_B=data["advantages"])
        model = Qwen2_5_VLModel(arch, groups, init_weights=False)
        load_hf_weights(model, hf_dir)
        policy = MegatronPolicy(model, groups, PolicyOptimConfig(
            optimizer="sgd", lr=0.0, grad_clip=0.0, weight_decay=0.0, max_tokens_per_micro_batch=80,
            sequence_packing=packed, temperature=0.7))
        logprobs = policy.compute_logprobs(batch)
        batch.old_logprobs_BT = data["old"]
        metrics = policy.train_step(batch)  # lr 0: gradients stay in the buffers
        grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        computed, real = policy.layout.padded_tokens(batch)
        out[packed] = {"logprobs": logprobs, "loss": metrics["loss"], "grads": grads, "computed": computed,
                       "real": real, "rows": len(policy.layout.plan([int(n) for n in batch.attention_mask_BT.sum(1)]))}
    left_padded = PolicyBatch(input_ids_BT=torch.tensor([[0, 0, 11, 12], [11, 12, 13, 14]]),
                              attention_mask_BT=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    try:
        policy.compute_logprobs(left_padded)
    except ValueError as error:
        out["left_padded"] = str(error)
    return out


@pytest.mark.distributed
def test_packed_step_equals_the_bucketed_step(tmp_path):
    hf_dir, data, full = tiny_step_inputs(tmp_path)
    (result,) = run_workers(packing_worker, world_size=1, args=(str(hf_dir), data))
    assert max(result["rope_errors"]) < 1e-6
    bucketed, packed = result[False], result[True]
    valid = full.loss_mask_BT.bool() | (full.attention_mask_BT[:, 1:] * full.attention_mask_BT[:, :-1]).bool()
    torch.testing.assert_close(packed["logprobs"][valid], bucketed["logprobs"][valid], rtol=0, atol=1e-5)
    assert abs(bucketed["loss"]) > 1e-3 and packed["loss"] == pytest.approx(bucketed["loss"], abs=1e-6)
    assert sum(float(g.abs().sum()) for g in bucketed["grads"].values()) > 0
    for name, grad in bucketed["grads"].items():  # the vision tower's too: images ride in packed rows
        torch.testing.assert_close(packed["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert packed["real"] == bucketed["real"] == packed["computed"] < bucketed["computed"]  # no padding at all here
    assert packed["rows"] < bucketed["rows"]
    assert "needs right-padded samples" in result["left_padded"] and "samples [0]" in result["left_padded"]
