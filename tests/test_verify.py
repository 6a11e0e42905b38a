"""The verifier on small hand-made TaskGraphs: the correct graph passes, each planted bug is named."""

import pytest

from mpk.compiler.verify import Clocks, VerificationError, check_deadlock, verify
from mpk.taskgraph import Event, OpSpec, Region, Task, TaskGraph, TensorSpec


def graph(tensors, ops, tasks, events, queues) -> TaskGraph:
    """A TaskGraph around hand-made parts; sets each task's queue from `queues`."""
    for q, queue in enumerate(queues):
        for tid in queue:
            tasks[tid].queue = q
    return TaskGraph(model={}, batch=1, max_seq_len=1, tp_size=1, num_sms=len(queues),
                     tensors={t.name: t for t in tensors}, ops=ops, tasks=tasks, events=events, queues=queues)


def task(tid, op, tile, reads=(), writes=(), wait=-1, signals=()):
    return Task(tid, op, tile, [Region(*r) for r in reads], [Region(*w) for w in writes], 0, 0, wait, list(signals))


def chain(queues=((0, 2, 4), (1, 3))) -> TaskGraph:
    """embed (2 tiles) -> mlp (2 tiles, tile i needs embed tile i only) -> sample -> next step's embed.

    Task ids: 0, 1 embed; 2, 3 mlp; 4 sample. Sample writes the token that embed reads next step
    (event 0, lag 1).
    """
    tensors = [
        TensorSpec("tokens", "meta", (1,), "int64"),
        TensorSpec("emb", "weight", (16, 8), "bfloat16"),
        TensorSpec("h", "activation", (1, 8), "bfloat16"),
        TensorSpec("y", "activation", (1, 8), "bfloat16"),
    ]
    ops = [OpSpec("embed", "embed", 0, None), OpSpec("mlp", "mlp", 0, 0), OpSpec("sample", "sample", 0, None)]
    tasks = [
        task(0, 0, (0,), [("tokens", ((0, 1),)), ("emb", ((0, 16), (0, 4)))], [("h", ((0, 1), (0, 4)))], 0, [1]),
        task(1, 0, (1,), [("tokens", ((0, 1),)), ("emb", ((0, 16), (4, 8)))], [("h", ((0, 1), (4, 8)))], 0, [2]),
        task(2, 1, (0,), [("h", ((0, 1), (0, 4)))], [("y", ((0, 1), (0, 4)))], 1, [3]),
        task(3, 1, (1,), [("h", ((0, 1), (4, 8)))], [("y", ((0, 1), (4, 8)))], 2, [3]),
        task(4, 2, (0,), [("y", ((0, 1), (0, 8)))], [("tokens", ((0, 1),))], 3, [0]),
    ]
    events = [
        Event(0, [4], 1, 1, 0, 2),
        Event(1, [0], 1, 0, 2, 3),
        Event(2, [1], 1, 0, 3, 4),
        Event(3, [2, 3], 2, 0, 4, 5),
    ]
    return graph(tensors, ops, tasks, events, [list(q) for q in queues])


def failure(tg: TaskGraph) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify(tg)
    return info.value


def test_correct_chain_passes():
    report = verify(chain())
    assert report.tasks == 5 and report.instances == 10
    assert report.race_pairs > 0 and report.covered_reads > 0
    assert "pass" == report.as_dict()["verdict"]


def test_passes_after_json_round_trip():
    verify(TaskGraph.from_json(chain().to_json()))


def test_happens_before_follows_events_and_queues():
    tg = chain()
    clocks = Clocks.from_order(tg, check_deadlock(tg))
    assert clocks.happens_before(0, 0, 2, 0)  # embed 0 -> mlp 0 (event 1)
    assert not clocks.happens_before(0, 0, 3, 0)  # embed 0 and mlp 1 are independent
    assert not clocks.happens_before(3, 0, 0, 0)
    assert clocks.happens_before(4, 0, 1, 1)  # sample -> next step's embed (lag 1)
    assert not clocks.happens_before(4, 0, 1, 0)
    assert clocks.happens_before(1, 0, 3, 0) and clocks.happens_before(3, 0, 4, 0)


def test_dropped_dependency_is_a_race_on_the_tensor():
    tg = chain()
    tg.events[3].producers = [2]  # sample no longer waits for mlp tile 1
    tg.events[3].target = 1
    tg.tasks[3].signals = []
    err = failure(tg)
    assert err.check in ("race", "coverage")
    assert "'y'" in str(err) and "task 3 (mlp tile (1,))" in str(err) and "task 4 (sample" in str(err)


def test_overlapping_writes_race_names_both_tasks():
    tg = chain()
    tg.tasks[0].writes = [Region("h", ((0, 1), (0, 6)))]  # into embed tile 1's columns
    err = failure(tg)
    assert err.check == "race"
    assert "task 0 (embed tile (0,))" in str(err) and "task 1 (embed tile (1,))" in str(err)
    assert "h[0:1, 0:6]" in str(err) and "h[0:1, 4:8]" in str(err)


def test_consumer_before_its_producer_on_one_queue_deadlocks():
    err = failure(chain(queues=((2, 0, 4), (1, 3))))
    assert err.check == "deadlock"
    assert "queue 0 (SM 0)" in str(err) and "event 1" in str(err)
    assert "task 2 (mlp tile (0,))" in str(err) and "task 0 (embed tile (0,))" in str(err)  # waiter and producer


def test_wrong_target_is_named():
    tg = chain()
    tg.events[3].target += 1
    err = failure(tg)
    assert err.check == "events" and "event 3" in str(err) and "target 3" in str(err)


def test_producer_list_must_match_signals():
    tg = chain()
    tg.tasks[3].signals = []  # still listed as a producer of event 3
    err = failure(tg)
    assert err.check == "events" and "event 3" in str(err) and "task 3" in str(err)


def test_task_on_no_queue_is_named():
    err = failure(chain(queues=((0, 2, 4), (1,))))
    assert err.check == "queues" and "task 3" in str(err)


def test_write_to_weight_is_rejected():
    tg = chain()
    tg.tasks[2].writes.append(Region("emb", ((0, 1), (0, 1))))
    err = failure(tg)
    assert "emb[0:1, 0:1]" in str(err) and "read-only" in str(err)


def with_scratch(queues) -> TaskGraph:
    """Both mlp tiles also write all of `acc`, which sample reads: ordered only if on one queue."""
    tg = chain(queues)
    tg.tensors["acc"] = TensorSpec("acc", "activation", (1, 8), "bfloat16")
    for tid in (2, 3):
        tg.tasks[tid].writes.append(Region("acc", ((0, 1), (0, 8))))
    tg.tasks[4].reads.append(Region("acc", ((0, 1), (0, 8))))
    return tg


def test_writers_ordered_only_by_queue_order_are_fine():
    report = verify(with_scratch(queues=((0, 2, 3, 4), (1,))))
    assert report.covered_reads > 0


def test_same_writers_on_two_queues_race():
    err = failure(with_scratch(queues=((0, 2, 4), (1, 3))))
    assert err.check == "race" and "'acc'" in str(err)


def test_gap_in_the_writes_is_uncovered():
    tg = chain()
    tg.tasks[2].writes = [Region("y", ((0, 1), (0, 3)))]  # column 3 of y is never written
    err = failure(tg)
    assert err.check == "coverage" and "y[0:1, 3:4]" in str(err) and "task 4 (sample" in str(err)


def test_activation_read_before_anything_wrote_it():
    tg = chain()
    tg.tensors["tokens"] = TensorSpec("tokens", "activation", (1,), "int64")  # not host-initialized
    err = failure(tg)
    assert err.check == "coverage" and "which nothing wrote before it" in str(err) and "step 0" in str(err)


def test_counter_signal_of_the_next_step_cannot_stand_in():
    """Event 0 orders c after a and b without data; a can run ahead and signal for step 1 early."""
    tensors = [TensorSpec("u", "activation", (2,), "bfloat16")]
    ops = [OpSpec("a", "x", 0, None), OpSpec("b", "x", 0, None), OpSpec("c", "x", 0, None)]
    tasks = [
        task(0, 0, (0,), [], [("u", ((0, 1),))], signals=[0]),
        task(1, 1, (0,), [], [("u", ((1, 2),))], signals=[0]),
        task(2, 2, (0,), [], [], wait=0),
    ]
    tg = graph(tensors, ops, tasks, [Event(0, [0, 1], 2, 0, 2, 3)], [[0], [1], [2]])
    err = failure(tg)
    assert err.check == "counters" and "event 0" in str(err)


def layered(layers: int = 8, width: int = 12, num_queues: int = 5) -> TaskGraph:
    """A synthetic decode-like graph: layers alternating fine-grained reads (tile i of the previous
    layer's tiles i and i+1) and all-to-all reads, then a sample task writing the token that the
    next step's first layer reads (lag 1). Tiles go round-robin over the queues, in id order.
    """
    sample = layers * width  # the last task
    tensors = [TensorSpec("tokens", "meta", (1,), "int64")]
    ops, tasks, events = [], [], []

    def add_event(producers, lag, first, stop):
        events.append(Event(len(events), sorted(set(producers)), len(set(producers)), lag, first, stop))
        return events[-1].id

    for layer in range(layers):
        act, cols = f"act{layer}", width * 4
        tensors += [TensorSpec(act, "activation", (1, cols), "bfloat16"),
                    TensorSpec(f"w{layer}", "weight", (cols, cols), "bfloat16")]
        ops.append(OpSpec(f"layer{layer}", "x", 0, layer))
        base = layer * width
        if layer == 0:
            shared = add_event([sample], 1, base, base + width)
        elif layer % 2 == 0:
            shared = add_event(range(base - width, base), 0, base, base + width)
        for i in range(width):
            if layer == 0:
                src, wait = ("tokens", ((0, 1),)), shared
            elif layer % 2 == 0:
                src, wait = (f"act{layer - 1}", ((0, 1), (0, cols))), shared
            else:
                j = min(i + 1, width - 1)
                src = (f"act{layer - 1}", ((0, 1), (4 * i, 4 * j + 4)))
                wait = add_event([base - width + i, base - width + j], 0, base + i, base + i + 1)
            weight = (f"w{layer}", ((0, cols), (4 * i, 4 * i + 4)))
            tasks.append(task(base + i, layer, (i,), [src, weight], [(act, ((0, 1), (4 * i, 4 * i + 4)))], wait))
    ops.append(OpSpec("sample", "sample", 0, None))
    last = (f"act{layers - 1}", ((0, 1), (0, width * 4)))
    wait = add_event(range(sample - width, sample), 0, sample, sample + 1)
    tasks.append(task(sample, layers, (0,), [last], [("tokens", ((0, 1),))], wait))
    for ev in events:
        for p in ev.producers:
            tasks[p].signals.append(ev.id)
    queues = [[] for _ in range(num_queues)]
    for t in tasks:
        queues[t.id % num_queues].append(t.id)
    return graph(tensors, ops, tasks, events, queues)


def test_layered_graph_passes():
    report = verify(layered())
    assert report.instances == 2 * (8 * 12 + 1)


def test_layered_graph_with_a_dropped_fine_grained_producer_races():
    tg = layered()
    ev = next(e for e in tg.events if e.target == 2)  # tile i of an odd layer waits for tiles i, i+1
    dropped = ev.producers.pop()
    ev.target = 1
    tg.tasks[dropped].signals.remove(ev.id)
    err = failure(tg)
    assert err.check == "race" and tg.describe_task(dropped) in str(err)


def exchange(queues=((0, 2), (1, 3)), tp_size=2) -> TaskGraph:
    """Two ranks, one SM each: each rank makes its partial p_r, then reads the peer's (an allreduce's
    shape). Task ids: 0 rank 0's partial, 1 rank 1's, 2 rank 0's reduce (reads p1), 3 rank 1's (reads p0).
    Rank 0's reduce waits on event 0 (produced on rank 1), rank 1's on event 1 (produced on rank 0);
    the next step's partials wait for both reduces (event 2, lag 1), as the sampled token orders them.
    """
    tensors = [TensorSpec("rank0/p", "activation", (1, 4), "float32", 0),
               TensorSpec("rank1/p", "activation", (1, 4), "float32", 1),
               TensorSpec("rank0/x", "activation", (1, 4), "float32", 0),
               TensorSpec("rank1/x", "activation", (1, 4), "float32", 1)]
    ops = [OpSpec("part", "linear", 0, 0), OpSpec("part", "linear", 1, 0),
           OpSpec("reduce", "allreduce_residual", 0, 0), OpSpec("reduce", "allreduce_residual", 1, 0)]
    whole = ((0, 1), (0, 4))
    tasks = [
        task(0, 0, (0,), [], [("rank0/p", whole)], wait=2, signals=[1]),
        task(1, 1, (0,), [], [("rank1/p", whole)], wait=2, signals=[0]),
        task(2, 2, (0,), [("rank1/p", whole)], [("rank0/x", whole)], wait=0, signals=[2]),
        task(3, 3, (0,), [("rank0/p", whole)], [("rank1/x", whole)], wait=1, signals=[2]),
    ]
    events = [Event(0, [1], 1, 0, 2, 3), Event(1, [0], 1, 0, 3, 4), Event(2, [2, 3], 2, 1, 0, 2)]
    tg = graph(tensors, ops, tasks, events, [list(q) for q in queues])
    tg.tp_size, tg.num_sms = tp_size, len(queues) // tp_size
    return tg


def test_cross_rank_exchange_passes():
    report = verify(exchange())
    assert report.race_pairs > 0 and report.covered_reads > 0


def test_a_dropped_cross_rank_dependency_is_a_race_on_the_peer_tensor():
    tg = exchange()
    tg.tasks[2].wait, tg.tasks[1].signals = -1, []  # rank 0 reads rank 1's partial unordered
    tg.events = [tg.events[1], tg.events[2]]
    for i, ev in enumerate(tg.events):
        ev.id = i
    tg.tasks[0].signals, tg.tasks[3].wait = [0], 0
    for t in (0, 1):
        tg.tasks[t].wait = 1
    tg.tasks[2].signals = tg.tasks[3].signals = [1]
    err = failure(tg)
    assert err.check == "race" and "'rank1/p'" in str(err)
    assert "task 1 (part tile (0,))" in str(err) and "task 2 (reduce tile (0,))" in str(err)


def test_a_wait_cycle_across_ranks_deadlocks_and_names_both():
    """Each rank reads the peer's partial before making its own: each waits for the other."""
    err = failure(exchange(queues=((2, 0), (3, 1))))
    assert err.check == "deadlock"
    assert "rank 0 SM 0" in str(err) and "rank 1 SM 0" in str(err)
