"""The planner against hand-computed numbers, the model cards' parameter counts, EasyR1's published step time,
and its refusals of recipes that cannot fit in 80 GiB."""

import re

import pytest

from mmupt_megatron.cli import main
from mmupt_megatron.config_loading import CONFIG_DIR, load_config
from mmupt_megatron.launch.arch import QWEN2_5_VL, arch_for
from mmupt_megatron.launch.planner import GIB, PlanAssumptions, check_fits, plan

SCALING = sorted(p.stem for p in CONFIG_DIR.glob("qwen2_5_vl_*n8g_*.yaml"))


def test_parameter_counts_match_the_model_cards():
    # Hugging Face model cards: 3.75B, 8.29B, 33.5B, 73.4B parameters (7B exactly 8,292,166,656 in safetensors)
    assert QWEN2_5_VL["qwen2.5-vl-7b"].total_params == 8_292_166_656
    for key, billions in (("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-32b", 33.5), ("qwen2.5-vl-72b", 73.4)):
        assert QWEN2_5_VL[key].total_params / 1e9 == pytest.approx(billions, rel=3e-3)
    assert arch_for(model_path="/checkpoints/Qwen2.5-VL-32B-Instruct").name == "qwen2.5-vl-32b"
    with pytest.raises(ValueError, match="--model"):
        arch_for(model_path="/checkpoints/my-model")


def test_seven_b_tp2_dp4_against_hand_computed_values():
    cfg = load_config("qwen2_5_vl_7b_1n8g_tp2")  # TP2 PP1 DP4, micro-batch 2, recompute on, KL on, FP8 off
    p = plan(cfg, QWEN2_5_VL["qwen2.5-vl-7b"])
    # one decoder layer: q/k/v with biases 3584*(3584+2*512) + 4608, o 3584^2, SwiGLU 3*3584*18944, 2 norms
    layer = 3584 * 4608 + 4608 + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert layer == 233_057_792
    vit = 676_550_144
    per_gpu = 28 * layer / 2 + 2 * 152064 * 3584 / 2 + 3584 + vit  # layers/TP + embedding/TP + lm_head/TP + norm + ViT
    assert p.train_gib["weights (bf16)"] == pytest.approx(2 * per_gpu / GIB)
    assert p.train_gib["grads (fp32)"] == pytest.approx(4 * per_gpu / GIB)
    assert p.train_gib["optimizer (fp32 x3 / DP)"] == pytest.approx(12 * per_gpu / 4 / GIB)
    assert p.logprob_gib["reference (bf16)"] == pytest.approx(2 * per_gpu / GIB)  # resident for log-probs only
    assert "reference (bf16)" not in p.train_gib
    tokens = 2 * 4096
    # no sequence parallelism: layer inputs whole (2h per layer); the backward peaks with the logits (5.5 bytes per
    # entry, measured 5.0-6.1) + the output layer's bf16 weight gradient, larger than one recomputed layer
    # 8h + (4h + 4kv + 6f) / TP
    lm = tokens * 28 * 2 * 3584
    head = tokens * 152064 / 2 * 5.5 + 2 * 152064 / 2 * 3584
    assert head > tokens * (8 * 3584 + (4 * 3584 + 4 * 512 + 6 * 18944) / 2)
    patches = 2 * 1003520 / 14**2
    vision = patches * (32 * 2 * 1280 + 16 * 1280 + 6 * 3420)
    assert p.train_gib["activations"] == pytest.approx((lm + vision + head) / GIB)
    assert p.train_total == pytest.approx(48.0, abs=0.05)
    # 4 engines of TP 2 share the 8 policy GPUs; during rollout the policy is on CPU
    # refit: each TP-2 engine shares the sending GPU of its replica (NCCL cannot) -> host shared memory
    assert (p.num_engines, p.num_gpus, p.colocated, p.refit_transport) == (4, 8, True, "shm")
    assert set(p.rollout_gib) == {"overhead", "vLLM weights", "vLLM activations", "vLLM KV cache"}
    # vLLM TP2: weights 2 bytes x params / 2; KV per token 2 x 28 layers x 2 KV heads x 128 x 2 bytes
    kv_gib = 0.5 * 80 - 8_292_166_656 / GIB - 2
    assert p.kv_sequences == pytest.approx(kv_gib * GIB / (2 * 28 * 2 * 128 * 2 * 4096))
    n, trained = 8_292_166_656, 5120 * (512 + 512)
    assert p.flops["training"] == 6 * n * trained
    assert p.flops["log-prob forwards"] == 2 * 2 * n * trained  # old policy + reference
    # one update per step (all 512 prompts in one mini-batch) is on policy: the reference pass only
    one_update = plan(load_config("qwen2_5_vl_7b_1n8g_tp2", ["trainer.prompts_per_update=512"]), QWEN2_5_VL["qwen2.5-vl-7b"])
    assert one_update.flops["log-prob forwards"] == 2 * n * trained
    assert p.flops["rollout"] == 2 * n * (5120 * 512 + 512 * 512)
    assert p.refit_gb == pytest.approx(2 * n / 1e9)
    # host shared memory: every engine its full bf16 copy at 2-10 GB/s (the replicas send at once)
    assert p.refit_s == pytest.approx((2 * n / 10e9, 2 * n / 2e9))
    # decode: 1280 sequences per engine, 256 running; a step reads 8.29 GB of weights + 256 x 768 tokens of KV
    step_bytes = 2 * n / 2 + 256 * 768 * (2 * 28 * 2 * 128 * 2)
    decode_fast = (5 * 512 + 2048 - 512) * step_bytes / (3350e9 * 0.8)  # 5 waves + the longest response's tail
    prefill_fast = 2 * n * 512 * 512 / (8 * 989e12 * 0.23)
    assert p.rollout_s[0] == pytest.approx(decode_fast + prefill_fast)
    assert not p.problems


def test_engines_on_their_own_gpus_hold_the_policy_resident():
    cfg = load_config("qwen2_5_vl_7b_1n8g_tp2", ["trainer.colocate=false", "rollout.num_engines=2"])
    p = plan(cfg, QWEN2_5_VL["qwen2.5-vl-7b"])
    assert (p.num_engines, p.num_gpus, p.refit_transport) == (2, 8 + 2 * 2, "nccl")
    assert p.refit_s == pytest.approx((2 * 8_292_166_656 / 50e9, 2 * 8_292_166_656 / 25e9))
    colocated = plan(load_config("qwen2_5_vl_7b_1n8g_tp2"), QWEN2_5_VL["qwen2.5-vl-7b"])
    assert p.rollout_s[0] > colocated.rollout_s[0]  # 2 engines decode what 4 did


def test_easyr1_seven_b_step_time():
    """EasyR1 (hiyouga/EasyR1) Qwen2.5-VL-7B GRPO on 8xH100: 120-145 s/step at actor MFU 16-23%
    (/work/shared/STACK.md). Its example recipe: 512 prompts x n=5 on Geometry3K; we assume Geo3K-like mean
    lengths of 200 prompt tokens (small diagrams, ~80-150 image tokens + the question) and 450 response tokens."""
    cfg = load_config("qwen2_5_vl_7b_1n8g_tp2", ["rollout.n=5"])
    p = plan(cfg, QWEN2_5_VL["qwen2.5-vl-7b"],
             assumptions=PlanAssumptions(mean_prompt_tokens=200, mean_response_tokens=450))
    low, high = p.step_s
    assert low < 145 and high > 120, p.step_s  # the ranges overlap
    assert 100 < (low + high) / 2 < 165


@pytest.mark.parametrize("recipe", SCALING)
def test_every_scaling_recipe_fits(recipe):
    cfg = load_config(recipe)
    p = plan(cfg, arch_for(model_path=cfg.model.path))
    assert not p.problems, p.problems
    assert p.train_total <= 80 and p.rollout_total <= 80


@pytest.mark.parametrize(("recipe", "overrides", "short"), [
    ("qwen2_5_vl_32b_2n8g_tp8pp2", ["parallel.pipeline_parallel_size=1", "parallel.data_parallel_size=1"], "32b on one node"),
    ("qwen2_5_vl_72b_4n8g_tp8pp4", ["parallel.pipeline_parallel_size=2", "parallel.data_parallel_size=1"], "72b on two nodes"),
])
def test_recipes_that_cannot_fit_are_refused(recipe, overrides, short):
    cfg = load_config(recipe, overrides)
    p = plan(cfg, arch_for(model_path=cfg.model.path))
    with pytest.raises(ValueError) as info:
        check_fits(p, recipe=recipe)
    message = str(info.value)
    assert "training phase needs" in message and "> 80 GiB" in message and "GiB short" in message, short
    assert "optimizer (fp32 x3 / DP)" in message and "parallel.tensor/pipeline/data_parallel_size" in message


def test_rollout_pool_too_large_is_refused():
    # the policy is on CPU during rollout (colocated), so only a pool over 80 GiB - 4 GiB of overhead is refused
    assert not plan(load_config("qwen2_5_vl_7b_1n8g_tp2", ["rollout.gpu_memory_utilization=0.9"]),
                    QWEN2_5_VL["qwen2.5-vl-7b"]).problems
    cfg = load_config("qwen2_5_vl_7b_1n8g_tp2", ["rollout.gpu_memory_utilization=1.0"])
    p = plan(cfg, QWEN2_5_VL["qwen2.5-vl-7b"])
    assert any("rollout phase needs" in m and "rollout.gpu_memory_utilization=1.0" in m for m in p.problems)


def test_cli_prints_the_table_and_refuses_with_exit_code_2(capsys):
    assert main(["plan", "qwen2_5_vl_7b_1n8g_tp2"]) == 0
    out = capsys.readouterr().out
    assert "training phase, per GPU (GiB)" in out and "step time" in out and "4 vLLM engine(s) colocated" in out
    assert "over shm" in out and "log-prob phase" in out
    code = main(["plan", "qwen2_5_vl_72b_4n8g_tp8pp4", "parallel.pipeline_parallel_size=2", "parallel.data_parallel_size=1"])
    assert code == 2
    assert "cannot run on 16 x qwen2.5-vl-72b" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", SCALING)
def test_recipe_comments_match_what_the_code_builds(recipe):
    cfg = load_config(recipe)
    header = (CONFIG_DIR / f"{recipe}.yaml").read_text().split("defaults:")[0]
    found = re.search(r"Megatron TP=(\d+) x PP=(\d+) x DP=(\d+), vLLM TP=(\d+) \((\d+) engines\), FP8 (on|off)", header)
    assert found, header
    p, r = cfg.parallel, cfg.rollout
    assert tuple(int(x) for x in found.groups()[:5]) == (
        p.tensor_parallel_size, p.pipeline_parallel_size, p.data_parallel_size, r.tensor_parallel_size, cfg.num_engines())
    assert (found.group(6) == "on") == cfg.model.fp8
    assert ("share the GPUs" in header) == cfg.trainer.colocate and "offloaded to CPU" in header
    gpus = re.search(r"\((\d+) GPUs\)", header)
    assert gpus and int(gpus.group(1)) == plan(cfg, arch_for(model_path=cfg.model.path)).num_gpus


def test_cli_counts_the_engines_own_gpus(capsys):
    code = main(["plan", "qwen2_5_vl_7b_1n8g_tp2", "trainer.colocate=false", "--cluster",
                 str(CONFIG_DIR / "clusters" / "example_slurm.yaml"), "--cluster-set", "nodes=1"])
    assert code == 2
    assert "needs 10 GPUs (TP x PP x DP + engines x rollout TP), the cluster has 8" in capsys.readouterr().err


@pytest.mark.parametrize(("recipe", "overrides", "transport"), [
    ("qwen2_5_vl_3b_1n8g_tp1", [], "cuda_ipc"),  # TP 1 everywhere: each engine on its replica's GPU
    ("qwen2_5_vl_7b_1n8g_tp2", [], "shm"),  # TP-2 engines share the sending GPU
    ("qwen2_5_vl_3b_1n8g_tp1", ["parallel.data_parallel_size=4", "trainer.colocate=false", "rollout.num_engines=4"],
     "nccl_nvlink"),  # 4 policy + 4 engine GPUs: one node
    ("qwen2_5_vl_7b_1n8g_tp2", ["trainer.colocate=false", "rollout.num_engines=2"], "nccl"),  # 12 GPUs: two nodes
])
def test_the_planner_prices_the_refit_transport_auto_picks(recipe, overrides, transport):
    from mmupt_megatron.launch.planner import PlanAssumptions, refit_transport_of

    assert refit_transport_of(load_config(recipe, overrides), PlanAssumptions()) == transport


def test_a_replica_spanning_nodes_refits_its_own_node_by_shared_memory_and_the_others_by_nccl():
    # 32B at TP 8 x PP 2: each replica's stages sit on two nodes, its colocated engines on both; shared memory works
    # only within a node (refit_routes.refit_transports), the stages take turns (refit_waves): the times add up
    p = plan(load_config("qwen2_5_vl_32b_2n8g_tp8pp2"), QWEN2_5_VL["qwen2.5-vl-32b"])
    assert p.refit_transport == "shm+nccl"
    gb = p.refit_gb
    assert p.refit_s == pytest.approx((gb / 10 + gb / 50, gb / 2 + gb / 25))


def test_the_checkpoint_phase_is_priced_without_gradients_or_awake_engines():
    p = plan(load_config("qwen2_5_vl_7b_1n8g_tp2"), QWEN2_5_VL["qwen2.5-vl-7b"])
    # weights + Adam state + overhead: the engines sleep during a save, the gradients stay on the host
    assert set(p.checkpoint_gib) == {"weights (bf16)", "optimizer (fp32 x3 / DP)", "overhead"}
    assert p.checkpoint_gib["weights (bf16)"] == p.train_gib["weights (bf16)"]
    assert sum(p.checkpoint_gib.values()) < p.train_total - p.train_gib["grads (fp32)"] + 1e-9
    # a card too small for it is refused, naming the phase
    from mmupt_megatron.launch.planner import PlanAssumptions

    small = plan(load_config("qwen2_5_vl_7b_1n8g_tp2"), QWEN2_5_VL["qwen2.5-vl-7b"],
                 assumptions=PlanAssumptions(gpu_memory_gib=20.0))
    assert any(problem.startswith("checkpoint phase needs") for problem in small.problems)


def test_colocated_log_prob_passes_run_without_gradients_or_optimizer_state():
    colocated = plan(load_config("qwen2_5_vl_7b_1n8g_tp2"), QWEN2_5_VL["qwen2.5-vl-7b"])
    assert not any(k.startswith(("grads", "optimizer")) for k in colocated.logprob_gib)  # trainer/schedule.before_train
    apart = plan(load_config("qwen2_5_vl_7b_1n8g_tp2", ["trainer.colocate=false", "rollout.num_engines=2"]),
                 QWEN2_5_VL["qwen2.5-vl-7b"])
    assert "grads (fp32)" in apart.logprob_gib  # the policy stays resident when the engines have GPUs of their own
