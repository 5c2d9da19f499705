"""The ``Cluster`` interface in one process, for testing the loop without Ray: a real world-1 Megatron policy
(``PolicyWorker``, gloo) and a scripted engine whose responses a test chooses, so that votes, rewards and
advantages are known in advance, under the colocated memory schedule (the policy's offloads are real). Every
call is recorded in ``calls``, every phase of the schedule in ``schedule.log``."""

from __future__ import annotations

from collections.abc import Callable

from mmupt_megatron.config import Config
from mmupt_megatron.data.configured import image_encoder
from mmupt_megatron.data.prompts import expand_image_pads
from mmupt_megatron.distributed.parallel import ParallelDims, free_port
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec
from mmupt_megatron.trainer.batching import BatchTraffic, loss_normalisers
from mmupt_megatron.trainer.cluster import policy_optim_config
from mmupt_megatron.trainer.schedule import MemorySchedule
from mmupt_megatron.trainer.workers import PolicyWorker

Script = Callable[[int, int], str]
"""(request position, sample index) -> the response text."""


class InProcessCluster:
    def __init__(self, cfg: Config, *, model_dir: str, script: Script) -> None:
        from transformers import AutoTokenizer

        self.worker = PolicyWorker(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                                   dims=ParallelDims(), model_dir=model_dir, optim=policy_optim_config(cfg),
                                   with_reference=cfg.algorithm.loss.kl_coef > 0, seed=cfg.trainer.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.images = image_encoder(cfg.data)
        self.script = script
        self.tokens = {"pad_id": self.tokenizer.pad_token_id, "eos_id": self.tokenizer.eos_token_id}
        self.image_token_id = self.worker.image_token_id()
        self.traffic = BatchTraffic(layout=self.worker.micro_batch_layout())
        self.calls: list[tuple] = []
        self.trained_advantages: list[list[float]] = []
        self.loss_scales: list[tuple[tuple[float, float], int]] = []  # (scale, the batch's loss tokens) per update
        self.num_engines = 1
        self.dims = ParallelDims()
        self.moved_bytes: list[int] = []
        self.schedule = MemorySchedule(self, colocated=True)  # DeviceOps: the methods below
        self.schedule.before_first_rollout()

    # -- DeviceOps ------------------------------------------------------------------------------------
    def engines_sleep(self) -> None:
        self.calls.append(("engines_sleep",))

    def engines_wake(self, tags: tuple[str, ...]) -> None:
        self.calls.append(("engines_wake", *tags))

    def policy_offload(self) -> None:
        self.moved_bytes.append(self.worker.offload())

    def policy_onload(self, *, grads: bool = True) -> None:
        self.worker.onload(grads=grads)

    def reference_onload(self) -> None:
        self.worker.onload_reference()

    def reference_offload(self) -> None:
        self.worker.offload_reference()

    def generate(self, requests: list[RolloutRequest], spec: SamplingSpec) -> list[Rollout]:
        self.calls.append(("generate", len(requests), spec.n))
        out = []
        for index, request in enumerate(requests):
            grids = [self.images.encode([image])[1][0].tolist() for image in request.images]
            prompt_ids = self.tokenizer(expand_image_pads(request.prompt, grids))["input_ids"]
            for sample in range(spec.n):
                text = self.script(index, sample)
                response = self.tokenizer(text)["input_ids"] + [self.tokenizer.eos_token_id]
                out.append(Rollout(group_id=request.group_id, prompt_index=index, sample_index=sample,
                                   prompt_token_ids=prompt_ids, response_token_ids=response,
                                   response_logprobs=[0.0] * len(response), text=text, finish_reason="stop"))
        return out

    def prompt_logprobs(self, requests, completions):  # noqa: ANN001 - not used with verify_refit off
        raise AssertionError("rollout.verify_refit is off in these tests")

    def release_engine(self) -> None:
        self.schedule.after_rollout()

    def logprobs(self, batch, *, reference: bool = False, temperature=None):  # noqa: ANN001 - PolicyBatch
        self.calls.append(("logprobs", "reference" if reference else "policy", batch.input_ids_BT.shape[0]))
        self.traffic.record([batch], copies=[1])
        if not reference:
            return self.worker.logprobs(batch, temperature=temperature)
        with self.schedule.reference():
            return self.worker.logprobs(batch, reference=True, temperature=temperature)

    def train(self, batch, *, scale: tuple[float, float] = (1.0, 1.0)) -> dict[str, float]:  # noqa: ANN001 - PolicyBatch
        self.calls.append(("train", batch.input_ids_BT.shape[0]))
        self.schedule.before_train()
        self.trained_advantages.append(batch.advantages_B.tolist())
        self.loss_scales.append((scale, int(batch.loss_mask_BT.sum())))
        self.traffic.record([batch], copies=[1])
        num_tokens, num_seqs = loss_normalisers(batch, scale)
        return self.worker.train(batch, global_num_tokens=num_tokens, global_num_seqs=num_seqs)

    def refit(self) -> int:
        self.schedule.before_refit()
        self.calls.append(("refit",))
        self.schedule.after_refit()
        return 0
