"""The compiler: tensor program -> tasks -> events -> schedule -> verified TaskGraph."""

from __future__ import annotations

import time

from mpk import defaults
from mpk.compiler.events import find_producers, fuse_and_linearize
from mpk.compiler.lower import lower
from mpk.compiler.schedule import CostModel, schedule
from mpk.graph import DEFAULT_ACTIVATIONS, DEFAULT_KV_CACHE, DEFAULT_MATMUL_INPUTS, Program, build_decode_program
from mpk.models.config import ModelConfig
from mpk.taskgraph import TaskGraph


def compile_program(prog: Program, cost: CostModel = CostModel()) -> TaskGraph:
    """Lower, derive and fuse events, linearize and schedule. Does not verify (see `compile_model`)."""
    t0 = time.perf_counter()
    raw = lower(prog)
    keys = find_producers(prog, raw)
    tasks, events, event_stats = fuse_and_linearize(raw, keys)
    ranks = [prog.ops[t.op].rank for t in tasks]
    queues, sched_stats = schedule(tasks, events, ranks, prog.tp_size, prog.num_sms, cost, follows(prog, tasks, events))
    stats = {**event_stats, **sched_stats, "compile_seconds": time.perf_counter() - t0}
    return TaskGraph(
        model={"name": prog.cfg.name, **prog.cfg.to_dict()},
        batch=prog.batch, max_seq_len=prog.max_seq_len, tp_size=prog.tp_size, num_sms=prog.num_sms,
        tensors=prog.tensors, ops=prog.ops, tasks=tasks, events=events, queues=queues, stats=stats,
        precision=prog.precision, one_step=prog.one_step,
    )


def follows(prog: Program, tasks, events) -> dict[int, int]:
    """Tasks that poll tagged words (`OpKind.polls_inputs`) and the producer on their own rank whose SM
    they take, right after it: the words that producer pushed are then this SM's own latest writes,
    and the poll waits only for the other ranks' (which sit at the same place in their queues)."""
    from mpk.ops import OP_KINDS

    pinned = {}
    for t in tasks:
        op = prog.ops[t.op]
        if not OP_KINDS[op.kind].polls_inputs or t.wait < 0:
            continue
        mine = [p for p in events[t.wait].producers if prog.ops[tasks[p].op].rank == op.rank]
        if len(mine) == 1:
            pinned[t.id] = mine[0]
    return pinned


def compile_model(cfg: ModelConfig, batch: int = 1, max_seq_len: int = defaults.MAX_SEQ_LEN, tp_size: int = 1,
                  num_sms: int = defaults.NUM_SMS, verify: bool = True, activations: str = DEFAULT_ACTIVATIONS,
                  weights: str = "bfloat16", kv_cache: str = DEFAULT_KV_CACHE,
                  matmul_inputs: str = DEFAULT_MATMUL_INPUTS) -> TaskGraph:
    """The verified decode-step TaskGraph of a model. Raises VerificationError if a check fails."""
    tg = compile_program(build_decode_program(cfg, batch, max_seq_len, tp_size, num_sms, activations, weights,
                                              kv_cache, matmul_inputs))
    if verify:
        from mpk.compiler.verify import verify as run_verifier

        tg.stats["verify"] = run_verifier(tg).as_dict()
    return tg
