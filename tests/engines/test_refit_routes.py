"""Which policy replica refits which engine (``engines/refit_routes.py``): on the engine's GPU first, then its
node, balanced among equals; across nodes only when nothing is closer. By which transport, per engine (host
memory only within a host), and in which order (senders broadcasting to shared engines take turns)."""

import pytest

from mmupt_megatron.engines.refit_routes import refit_sources, refit_transports


def test_colocated_engines_take_their_weights_from_the_replica_on_their_own_gpu():
    # one node, 8 GPUs, DP=8 (TP=1): engine e shares GPU e with replica e, listed in another order
    replicas = [[("n0", (str(g),))] for g in (3, 1, 0, 2, 7, 5, 4, 6)]
    engines = [("n0", (str(g),)) for g in range(8)]
    assert refit_sources(engines, replicas) == [2, 1, 3, 0, 6, 5, 7, 4]


def test_engines_on_another_node_take_the_replica_on_their_node_and_spread_over_equals():
    # two nodes; two replicas on each; four engines per node without GPU ids (vLLM's own TP workers hold them)
    replicas = [[("a", ("0",))], [("a", ("4",))], [("b", ("0",))], [("b", ("4",))]]
    engines = [("b", ())] * 4 + [("a", ())] * 4
    assert refit_sources(engines, replicas) == [2, 3, 2, 3, 0, 1, 0, 1]


def test_a_pipeline_replica_is_as_close_as_its_stages_and_one_replica_refits_every_engine():
    # PP=2 across nodes a and b: replica 0 has both stages' senders on a, replica 1 one on a and one on b
    replicas = [[("a", ("0",)), ("a", ("1",))], [("a", ("2",)), ("b", ("0",))]]
    assert refit_sources([("a", ()), ("b", ())], replicas) == [0, 1]
    assert refit_sources([("x", ())] * 3, [[("a", ())]]) == [0, 0, 0]  # DP=1: the one sender, wherever


def test_a_replica_without_senders_is_refused():
    with pytest.raises(ValueError, match="every replica needs at least one sender"):
        refit_sources([("a", ())], [[("a", ())], []])


@pytest.mark.parametrize(("engines", "colocated", "on_gpu", "expected"), [
    ([("a", ("3",))], True, True, [("ipc", [0])]),  # colocated, engine TP 1 on the sender's GPU: CUDA IPC
    ([("a", ("3",)), ("a", ("4",))], True, True, [("shm", [0, 1])]),  # one engine on a TP peer's GPU: no IPC there
    ([("a", ())], True, True, [("shm", [0])]),  # a TP engine (its workers hold the GPUs, one shares the sender's)
    ([("a", ("5",)), ("b", ("0",))], False, True, [("broadcast", [0, 1])]),  # engines on GPUs of their own: NCCL
    ([("a", ()), ("a", ())], True, False, [("shm", [0, 1])]),  # CPU, one host
    ([("a", ()), ("b", ())], False, False, [("shm", [0]), ("broadcast", [1])]),  # CPU, another host's engine
    # the review's bug: a pipeline stage on node a whose colocated engines sit on a and b. Shared memory and
    # device handles exist only within a host: b's engine takes its buckets by broadcast
    ([("b", ("3",)), ("a", ("3",)), ("b", ())], True, True, [("ipc", [1]), ("broadcast", [0, 2])]),
    ([("b", ()), ("b", ())], True, True, [("broadcast", [0, 1])]),
])
def test_auto_transport_follows_where_each_engine_is(engines, colocated, on_gpu, expected):
    sender = ("a", ("3",)) if on_gpu else ("a", ())
    assert refit_transports("auto", sender=sender, engines=engines, colocated=colocated, on_gpu=on_gpu) == expected
    assert refit_transports("broadcast", sender=sender, engines=engines, colocated=colocated,
                            on_gpu=on_gpu) == [("broadcast", list(range(len(engines))))]


def test_an_unknown_transport_and_host_memory_across_hosts_are_named():
    with pytest.raises(ValueError, match="rollout.refit_transport must be auto or one of.*got 'nccl'"):
        refit_transports("nccl", sender=("a", ()), engines=[], colocated=True, on_gpu=False)
    with pytest.raises(ValueError, match=r"refit_transport=shm: engine 1 runs on node b, the sender on a; shm works "
                                         r"only within a host"):
        refit_transports("shm", sender=("a", ()), engines=[("a", ()), ("b", ())], colocated=True, on_gpu=False)


def test_a_sender_of_several_transports_fills_one_buffer_and_every_transport_ships_it():
    import torch

    from mmupt_megatron.engines.weight_transport import BucketLayout, FanoutSender

    class Sink:
        def __init__(self, refusal=None):  # noqa: ANN001
            self.refusal, self.sent, self.data, self.offered = refusal, [], torch.zeros(0, dtype=torch.uint8), 0

        def offer(self, manifest):  # noqa: ANN001, ARG002
            self.offered += 1
            return self.refusal

        def buffer(self, layout):  # noqa: ANN001
            self.data = torch.zeros(layout.nbytes, dtype=torch.uint8)
            return self.data

        def send(self, layout):  # noqa: ANN001
            self.sent.append(bytes(self.data[: layout.nbytes].tolist()))

        def close(self):
            pass

    layout = BucketLayout(index=0, groups=("g",), entries=(), offsets=(), nbytes=4)
    first, second = Sink(), Sink(refusal="engine 1 says no")
    fan = FanoutSender([first, second])
    assert fan.offer([]) == "engine 1 says no" and first.offered == second.offered == 1
    fan.buffer(layout).copy_(torch.tensor([1, 2, 3, 4], dtype=torch.uint8))
    fan.send(layout)
    assert first.sent == second.sent == [bytes([1, 2, 3, 4])]
    with pytest.raises(RuntimeError, match="no buffer was handed out"):
        fan.send(layout)


def test_senders_broadcasting_to_shared_engines_take_turns_and_the_rest_refit_at_once():
    from mmupt_megatron.engines.refit_routes import refit_waves

    # PP=2, TP=2, DP=1, two engines, broadcast: stage 0 = ranks 0/1, stage 1 = ranks 2/3, both refit engines 0 and 1.
    # At once, engine 0 could run stage 0's rendezvous while engine 1 runs stage 1's: each waits for the other.
    pp2 = [((0, 0), [0, 1], "broadcast")] * 2 + [((0, 1), [0, 1], "broadcast")] * 2
    assert refit_waves(pp2) == [[0, 1], [2, 3]]
    # DP=2 x PP=2: each replica's stages share its own engine; the replicas' engines differ: two waves of two
    dp2pp2 = [((0, 0), [0], "broadcast"), ((0, 1), [0], "broadcast"), ((1, 0), [1], "broadcast"),
              ((1, 1), [1], "broadcast")]
    assert refit_waves(dp2pp2) == [[0, 2], [1, 3]]
    # transports whose buckets are not collectives (shm, ipc, ray) never wait for another sender: one wave
    assert refit_waves([(u, e, "shm") for u, e, _ in pp2]) == [[0, 1, 2, 3]]
    # ranks that refit nothing (a replica with no engine) go with the first wave; the first sender's TP
    # peers stay with it even when only the sender's transport is a collective
    assert refit_waves([((0, 0), [0], "broadcast"), ((0, 0), [0], "shm"), ((1, 0), [], "shm"),
                        ((0, 1), [0], "broadcast")]) == [[0, 1, 2], [3]]
    # a sender using several transports (its host's engines by shm, another host's by broadcast) is collective
    assert refit_waves([((0, 0), [0, 1], ["shm", "broadcast"]), ((0, 1), [1], ["broadcast"])]) == [[0], [1]]


def test_a_refit_group_whose_members_never_come_fails_in_seconds_naming_the_group():
    import socket
    import time

    import torch

    from mmupt_megatron.engines.vllm_worker import refit_group

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"refit group 127\.0\.0\.1:{port}: rank 0 waited 2 s "
                                           r"\(rollout\.refit_timeout_s\) for the group's 3 members"):
        refit_group("127.0.0.1", port, 0, 3, torch.device("cpu"), timeout_s=2)
    assert time.monotonic() - start < 30


def test_a_partial_reload_is_quiet_in_any_process_and_the_level_comes_back():
    import logging

    from mmupt_megatron.engines.vllm_worker import RELOAD_LOGGER, quiet_partial_reload

    logger = logging.getLogger(RELOAD_LOGGER)
    logger.setLevel(logging.INFO)
    with quiet_partial_reload():
        assert not logger.isEnabledFor(logging.WARNING)  # "Failed to load weights" per untouched layer: silenced
    assert logger.level == logging.INFO
