"""The TaskGraph: the contract between the compiler and both executors (the CPU sim and the GPU).

Everything an executor needs is here, explicitly, and it round-trips through JSON:
tensors, ops (one fused decode operator each), tasks (one tile of one op, run by one SM, with the
regions it reads and writes), events (counters that order tasks), and per-SM queues.

Conventions
- A box is a tuple of `(start, stop)` per dimension. A region is `(tensor name, box)` plus the
  role (operand name of its op kind, e.g. "weight") under which the task touches it.
- Tensor dtypes are explicit names of `mpk.dtypes.DTYPES`; `precision` says which were chosen.
- Task ids are positions in one global topological order; `queues[q]` lists task ids in that order.
  Queue `q` belongs to GPU rank `q // num_sms`, SM `q % num_sms`.
- Event `e` is a monotonic counter. Each producer task adds 1 per step. A consumer in step `s`
  waits until `count >= target * (s + 1 - lag)`: lag 0 waits for this step's producers, lag 1 for
  the previous step's (the token the last step sampled). Its consumers are the task range
  `[first_task, stop_task)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

Box = tuple[tuple[int, int], ...]

# mailbox: an activation whose elements travel with the step that wrote them (tagged words, written by
# a rank's producers into every rank's memory, polled by their consumers: mpk.ops.linear.LinearTagged).
# It is zeroed once, never poisoned: a zero tag is no step's.
TENSOR_KINDS = ("weight", "activation", "mailbox", "state", "meta")


@dataclass(frozen=True)
class Region:
    tensor: str
    box: Box
    role: str = ""

    def __str__(self) -> str:
        return f"{self.tensor}[{', '.join(f'{a}:{b}' for a, b in self.box)}]"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    kind: str  # one of TENSOR_KINDS
    shape: tuple[int, ...]
    dtype: str  # a key of mpk.dtypes.DTYPES
    rank: int = 0  # the GPU that owns it

    def full_box(self) -> Box:
        return tuple((0, n) for n in self.shape)


@dataclass(frozen=True)
class Precision:
    """The element types a program was built with: weights, activations (and GEMV inputs), KV cache."""

    weights: str = "bfloat16"
    activations: str = "float32"
    kv_cache: str = "bfloat16"
    # The x operand of the decode matrix products: the activations as they are, or (over float32
    # activations) rounded to bf16 first, with float32 accumulation (mpk.graph.precision_of).
    matmul_inputs: str = "float32"


@dataclass
class OpSpec:
    name: str
    kind: str  # a key of mpk.ops.OP_KINDS
    rank: int
    layer: int | None
    params: dict = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # role -> tensor name
    outputs: dict[str, str] = field(default_factory=dict)

    def tensor(self, role: str) -> str:
        """The tensor bound to operand `role`."""
        return self.inputs[role] if role in self.inputs else self.outputs[role]


@dataclass
class Task:
    id: int
    op: int  # index into TaskGraph.ops
    tile: tuple[int, ...]
    reads: list[Region]
    writes: list[Region]
    bytes: int  # bytes moved from/to memory (cost model)
    flops: int
    wait: int = -1  # event this task waits on, -1 for none
    signals: list[int] = field(default_factory=list)  # events it increments when done
    queue: int = -1


@dataclass
class Event:
    id: int
    producers: list[int]
    target: int
    lag: int
    first_task: int
    stop_task: int


@dataclass
class TaskGraph:
    model: dict
    batch: int
    max_seq_len: int
    tp_size: int
    num_sms: int
    tensors: dict[str, TensorSpec]
    ops: list[OpSpec]
    tasks: list[Task]
    events: list[Event]
    queues: list[list[int]]
    stats: dict = field(default_factory=dict)  # compiler facts for `mpk inspect` (fusion, cost)
    precision: Precision = field(default_factory=Precision)
    # Runs one step per launch (a prefill chunk): proven for that step alone, never run for more.
    one_step: bool = False

    @property
    def num_queues(self) -> int:
        return self.tp_size * self.num_sms

    def describe_task(self, tid: int) -> str:
        t = self.tasks[tid]
        op = self.ops[t.op]
        return f"task {tid} ({op.name} tile {t.tile})"

    def to_json(self) -> str:
        d = asdict(self)
        d["tensors"] = list(d["tensors"].values())
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "TaskGraph":
        d = json.loads(text)

        def box(b):
            return tuple(tuple(r) for r in b)

        def region(r):
            return Region(r["tensor"], box(r["box"]), r["role"])

        tensors = {
            t["name"]: TensorSpec(t["name"], t["kind"], tuple(t["shape"]), t["dtype"], t["rank"]) for t in d["tensors"]
        }
        tasks = [
            Task(
                id=t["id"], op=t["op"], tile=tuple(t["tile"]),
                reads=[region(r) for r in t["reads"]], writes=[region(r) for r in t["writes"]],
                bytes=t["bytes"], flops=t["flops"], wait=t["wait"], signals=list(t["signals"]), queue=t["queue"],
            )
            for t in d["tasks"]
        ]
        return cls(
            model=d["model"], batch=d["batch"], max_seq_len=d["max_seq_len"], tp_size=d["tp_size"],
            num_sms=d["num_sms"], tensors=tensors, ops=[OpSpec(**o) for o in d["ops"]], tasks=tasks,
            events=[Event(**e) for e in d["events"]], queues=d["queues"], stats=d.get("stats", {}),
            precision=Precision(**d["precision"]), one_step=d.get("one_step", False),
        )
