"""Lowering: every op of the tensor program becomes tasks, one per tile, with declared regions."""

from __future__ import annotations

from mpk.errors import MpkError
from mpk.graph import Program
from mpk.ops import OP_KINDS
from mpk.taskgraph import Task


def lower(prog: Program) -> list[Task]:
    """Tasks in program order (op by op); ids are provisional until the events pass reorders them."""
    tasks: list[Task] = []
    for op_index, op in enumerate(prog.ops):
        for tt in OP_KINDS[op.kind].tiles(op, prog):
            roles = [r.role for r in tt.reads + tt.writes]
            if len(set(roles)) != len(roles) or "" in roles:
                raise MpkError(f"{op.kind} tiles {op.name} with regions that lack a role or share one: {roles}")
            tasks.append(Task(len(tasks), op_index, tt.tile, tt.reads, tt.writes, tt.bytes, tt.flops))
    return tasks
