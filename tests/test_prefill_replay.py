"""Prefill chunks padded to a replayed shape (mpk.prefill_replay). The CUDA graphs themselves need a GPU
(tests/gpu/test_paging_gpu.py); here the padded pass runs eagerly on the CPU: it writes the prompt's K/V rows
as the unpadded pass does, and nothing outside the slot's own blocks and the scratch block."""

import pytest
import torch

from mpk.paging import SCRATCH_BLOCK
from mpk.prefill import pool_rows, prefill_program, run_ops
from mpk.prefill_replay import REPLAY_ROWS, replay_rows


def test_replay_rows_pad_to_a_multiple_within_the_context():
    assert [replay_rows(0, r, 4096) for r in (1, REPLAY_ROWS, REPLAY_ROWS + 1)] == [REPLAY_ROWS, REPLAY_ROWS,
                                                                                   2 * REPLAY_ROWS]
    assert replay_rows(100, 50, 160) == 59  # ends before the context's last position, which decode writes
    assert replay_rows(0, 10, 11) == 10


@pytest.mark.parametrize("start", [0, 16])
def test_a_padded_chunk_writes_the_prompts_rows_and_only_its_own_blocks(make_checkpoint, start):
    from mpk import LLM

    llm = LLM(str(make_checkpoint("qwen3", vocab_size=300)), backend="sim", dtype="float32", max_batch=2,
              max_seq_len=160, kv_block_rows=16, kv_blocks=12)
    tg, ex = llm._executor(2)
    pool = llm._block_pool(2)
    pool.grow(0, 30)  # another request's rows
    pool.grow(1, 40)  # the prompt's: 3 blocks of 16, its 36 prompt rows and room for decode
    table = pool.table()
    ex.set_kv_table(table)
    caches = {n: b for n, b in ex.buffers.items() if tg.tensors[n].kind == "state"}
    gen = torch.Generator().manual_seed(0)
    for buf in caches.values():
        buf.copy_(torch.randn(buf.shape, generator=gen))
    before = {n: b.clone() for n, b in caches.items()}
    tokens = torch.randint(1, 300, (36,), generator=gen)
    rows = 36 - start

    def prefill(padded: int) -> dict[str, torch.Tensor]:
        for name, buf in caches.items():
            buf.copy_(before[name])
        prog = prefill_program(tg, llm.cfg, padded, start, batch=1)
        chunk = torch.cat([tokens[start:], torch.zeros(padded - rows, dtype=torch.int64)])
        run_ops(prog, ex.buffers, [chunk], True, pool_rows(prog, ex.buffers, table[1:2]))
        return {n: b.clone() for n, b in caches.items()}

    plain, padded = prefill(rows), prefill(replay_rows(start, rows, tg.max_seq_len))
    assert replay_rows(start, rows, tg.max_seq_len) == REPLAY_ROWS > rows
    own = pool.owned[1]
    for name in caches:
        flat_plain, flat_padded = plain[name].flatten(0, 1), padded[name].flatten(0, 1)
        prompt_rows = [own[p // 16] * 16 + p % 16 for p in range(start, 36)]
        # Equal up to the fast mode's bf16 rounding: attention over the padded chunk's longer (masked) key
        # range sums in another order, and a last-bit difference can round a bf16 input the other way.
        diff = (flat_padded[prompt_rows] - flat_plain[prompt_rows]).abs().max() / flat_plain[prompt_rows].abs().max()
        assert diff < 1e-2, (name, float(diff))
        assert not torch.equal(flat_plain[prompt_rows], before[name].flatten(0, 1)[prompt_rows])  # it wrote them
        # Beyond the prompt: the rest of its own last block, then the scratch block; nothing else moved.
        touched = set(own) | {SCRATCH_BLOCK}
        for block in range(padded[name].shape[0]):
            if block not in touched:
                assert torch.equal(padded[name][block], before[name][block]), (name, block)
        for p in range(36):  # the rows before the prompt's chunk and of its positions: as the plain pass left them
            row = own[p // 16] * 16 + p % 16
            if p < start:
                assert torch.equal(flat_padded[row], before[name].flatten(0, 1)[row])


def test_a_shape_is_captured_the_second_time_it_comes_and_kept_while_it_is_replayed(monkeypatch):
    """The first chunk of a shape runs eagerly (run says False), the second captures it, later ones
    replay that capture; past REPLAYS_KEPT shapes the least recently replayed goes."""
    from types import SimpleNamespace

    import mpk.prefill_replay as pr

    captured, replayed = [], []

    class FakeGraph:  # records captures and replays; the real capture needs a GPU
        def __init__(self, executor, cfg, start, rows, pool):
            captured.append((start, rows))
            self.key = (start, rows)

        def run(self, tokens, kv_table):
            replayed.append((self.key, len(tokens)))

    monkeypatch.setattr(pr, "ChunkGraph", FakeGraph)
    monkeypatch.setattr(pr.torch.cuda, "graph_pool_handle", lambda: "pool")
    executor = SimpleNamespace(tg=SimpleNamespace(max_seq_len=4096))
    replays = pr.PrefillReplays()
    prompt = list(range(300))
    runs = [replays.run(executor, None, prompt, 0, 100, None) for _ in range(3)]
    assert runs == [False, True, True]
    assert captured == [(0, 2 * REPLAY_ROWS)]
    assert (replays.captured, replays.replayed, replays.eager) == (1, 2, 0)  # prefill_slot counts the eager ones
    assert replayed == [((0, 2 * REPLAY_ROWS), 2 * REPLAY_ROWS)] * 2
    for start in range(1, pr.REPLAYS_KEPT):  # as many new shapes as fill the store, each met twice
        assert [replays.run(executor, None, prompt, start, 10, None) for _ in range(2)] == [False, True]
    assert replays.run(executor, None, prompt, 0, 100, None) is True  # the first shape, replayed again: now the latest
    assert [replays.run(executor, None, prompt, 999, 10, None) for _ in range(2)] == [False, True]  # one more
    assert len(replays.graphs) == pr.REPLAYS_KEPT and (0, 2 * REPLAY_ROWS) in replays.graphs
    assert (1, REPLAY_ROWS) not in replays.graphs  # the least recently replayed went
    assert replays.run(executor, None, prompt, 1, 10, None) is False  # dropped: met anew


def test_the_shape_count_script_chunks_as_the_batcher_does():
    """scripts/prefill_shapes.py replays the batcher's chunking: a 9-row prompt, then 16 of a 30-row one's
    rows in the same 32-row window and its last 14 in the next (as tests/test_paging.py sees the batcher
    do), each padded to a replayed shape."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "prefill_shapes.py"
    spec = importlib.util.spec_from_file_location("prefill_shapes", script)
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    assert shapes.chunk_shapes([10, 31], 32, 8, 4096) == [(0, REPLAY_ROWS), (0, REPLAY_ROWS), (16, REPLAY_ROWS)]
    assert shapes.chunk_shapes([10, 31], 32, 8, 40) == [(0, 39), (0, 39), (16, 23)]  # within the context


def test_a_failed_capture_leaves_every_chunk_to_the_eager_path_and_says_so_once(monkeypatch, capsys):
    from types import SimpleNamespace

    import mpk.prefill_replay as pr

    attempts = []

    class FailingGraph:
        def __init__(self, *args):
            attempts.append(args[2:4])
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(pr, "ChunkGraph", FailingGraph)
    monkeypatch.setattr(pr.torch.cuda, "graph_pool_handle", lambda: "pool")
    executor = SimpleNamespace(tg=SimpleNamespace(max_seq_len=4096))
    replays = pr.PrefillReplays()
    prompt = list(range(300))
    assert [replays.run(executor, None, prompt, 0, 100, None) for _ in range(4)] == [False] * 4
    assert attempts == [(0, 2 * REPLAY_ROWS)]  # one capture tried, at the shape's second coming; none after
    assert replays.failed == "operation not permitted when stream is capturing"
    err = capsys.readouterr().err
    assert err.count("mpk: capturing a prefill chunk as a CUDA graph failed") == 1 and "op by op" in err
