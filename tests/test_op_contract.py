"""The op contract end to end on the CPU, with the example op of docs/adding-an-op.md: one class is
enough for the compiler, the verifier, the CPU executor and codegen."""

from __future__ import annotations

import pytest
import torch

from mpk import sim
from mpk.codegen import generate_source
from mpk.compiler import compile_program
from mpk.compiler.verify import verify
from mpk.errors import MpkError
from mpk.execution import allocate
from mpk.graph import Program
from mpk.models.config import ModelConfig
from mpk.ops import OP_KINDS
from mpk.ops.base import REGISTRY, Cuda, OpKind, Operand, TileTask, activation_policy, box, nbytes, shape, spans
from mpk.taskgraph import Precision


@pytest.fixture(scope="module")
def scale_rows():
    class ScaleRows(OpKind):
        """out[b, c0:c1] = x[b, c0:c1] * scale[c0:c1]."""

        kind = "scale_rows_example"
        header = "scale.cuh"
        template = "ScaleRows"
        inputs = (Operand("x"), Operand("scale"))
        outputs = (Operand("out"),)

        def tiles(self, op, prog):
            batch, n = shape(op, prog, "out")
            tasks = []
            for i, (c0, c1) in enumerate(spans(n, op.params["tile"])):
                reads = [box(op, "x", (0, batch), (c0, c1)), box(op, "scale", (c0, c1))]
                writes = [box(op, "out", (0, batch), (c0, c1))]
                tasks.append(TileTask((i,), reads, writes, sum(nbytes(prog, r) for r in reads + writes),
                                      batch * (c1 - c0)))
            return tasks

        def run(self, op, tile, t, step):
            t["out"].copy_(t["x"] * t["scale"])

        def cuda(self, op, tg):
            batch, n = tg.tensors[op.outputs["out"]].shape
            return Cuda((batch, activation_policy(tg)), ints={"n": n, "tile": op.params["tile"]})

    yield ScaleRows.kind
    del REGISTRY[ScaleRows.kind]


def program(kind: str, **bind) -> Program:
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=8)
    prog = Program(cfg, batch=2, max_seq_len=1, tp_size=1, num_sms=3, precision=Precision())
    prog.add_tensor(0, "x", "meta", (2, 40), "float32")
    prog.add_tensor(0, "scale", "weight", (40,), "bfloat16")
    prog.add_tensor(0, "out", "activation", (2, 40), "float32")
    inputs = bind.pop("inputs", {"x": "x", "scale": "scale"})
    prog.add_op(0, kind, "scale", 0, inputs, {"out": "out"}, tile=16)
    return prog


def test_one_class_is_enough_for_compiler_verifier_executor_and_codegen(scale_rows):
    assert scale_rows in OP_KINDS
    tg = compile_program(program(scale_rows))
    assert len(tg.tasks) == 3 and {r.role for t in tg.tasks for r in t.reads + t.writes} == {"x", "scale", "out"}
    verify(tg)
    x, scale = torch.randn(2, 40), torch.randn(40).bfloat16()
    bufs = allocate(tg, {"scale": scale}, {"x": x})
    sim.run(tg, bufs, num_steps=1)
    torch.testing.assert_close(bufs["out"], x * scale.float())
    src = generate_source(tg)
    assert '#include "scale.cuh"' in src
    assert "struct S0 { enum Ptr : int { x, scale, out }; enum Int : int { n, tile }; };" in src
    assert "using V0 = ScaleRows<S0, 2, ActF32>;" in src


def test_the_builder_checks_the_roles_it_binds(scale_rows):
    with pytest.raises(MpkError, match="has no tensor for its operand 'scale'"):
        program(scale_rows, inputs={"x": "x"})
    with pytest.raises(MpkError, match=r"binds undeclared operands \['gain'\]"):
        program(scale_rows, inputs={"x": "x", "scale": "scale", "gain": "scale"})
    with pytest.raises(MpkError, match="unknown op kind 'no_such_op'"):
        program("no_such_op")
