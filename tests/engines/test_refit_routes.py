"""Which policy replica refits which engine (``engines/refit_routes.py``): on the engine's GPU first, then its
node, balanced among equals; across nodes only when nothing is closer."""

import pytest

from mmupt_megatron.engines.refit_routes import refit_sources, refit_transport


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
    ([("a", ("3",))], True, True, "ipc"),  # colocated, engine TP 1 on the sender's GPU: CUDA IPC
    ([("a", ("3",)), ("a", ("4",))], True, True, "shm"),  # one engine on a TP peer's GPU: no IPC there
    ([("a", ())], True, True, "shm"),  # a TP engine (its workers hold the GPUs, one shares the sender's): no NCCL
    ([("a", ("5",)), ("b", ("0",))], False, True, "broadcast"),  # engines on GPUs of their own: NCCL
    ([("a", ()), ("a", ())], True, False, "shm"),  # CPU, one host
    ([("a", ()), ("b", ())], False, False, "ray"),  # CPU, several hosts
])
def test_auto_transport_follows_where_the_engines_are(engines, colocated, on_gpu, expected):
    sender = ("a", ("3",)) if on_gpu else ("a", ())
    assert refit_transport("auto", sender=sender, engines=engines, colocated=colocated, on_gpu=on_gpu) == expected
    assert refit_transport("broadcast", sender=sender, engines=engines, colocated=colocated, on_gpu=on_gpu) == "broadcast"


def test_an_unknown_transport_is_named():
    with pytest.raises(ValueError, match="rollout.refit_transport must be auto or one of.*got 'nccl'"):
        refit_transport("nccl", sender=("a", ()), engines=[], colocated=True, on_gpu=False)
