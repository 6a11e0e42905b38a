"""Paged KV cache: each layer's K and V live in a pool of fixed-size blocks, and a block table per
sequence says which block holds which of its rows.

The task graph keeps the logical view, [batch, max_seq_len, groups, head_dim] per cache tensor: the
verifier proves the tasks' regions in it, and every op's PyTorch reference reads it. Only storage
changes: logical row r of sequence b is row r % block_rows of block table[b, r // block_rows] of a
pool [num_blocks, block_rows, groups, head_dim]. The executors translate (the CPU executor gathers
and scatters a task's regions, the GPU's attention templates look the block up), and `BlockPool`
hands out blocks as sequences grow and takes them back when they finish.

Block 0 is never given to a sequence: table entries not yet backed point at it, so a slot with no
request (it still runs in the batch), or a request that finished before its window did, reads and
writes there, harmlessly (it starts zeroed, so the garbage stays finite), and never another
sequence's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mpk.defaults import KV_BLOCK_ROWS
from mpk.errors import MpkError
from mpk.util import cdiv

SCRATCH_BLOCK = 0


def check_block_rows(rows: int) -> None:
    """Blocks hold a power of two rows: the GPU's row lookup is then a shift and a mask (TaskCtx::kv_row)."""
    if rows < 1 or rows & (rows - 1):
        raise MpkError(f"a KV block holds a power of two rows (16, 64, ...), not {rows}")


@dataclass(frozen=True)
class KvPages:
    """How an executor stores its KV cache: `num_blocks` blocks of `block_rows` rows per cache tensor."""

    num_blocks: int
    block_rows: int = KV_BLOCK_ROWS

    def __post_init__(self):
        check_block_rows(self.block_rows)

    @classmethod
    def full(cls, slots: int, max_seq_len: int, block_rows: int) -> "KvPages":
        """As many blocks as `slots` sequences of `max_seq_len` rows fill, and the scratch block."""
        return cls(1 + slots * cdiv(max_seq_len, block_rows), block_rows)

    def table_shape(self, tg) -> tuple[int, int]:
        """The block table a graph's executor takes: one row of blocks per sequence."""
        return tg.batch, cdiv(tg.max_seq_len, self.block_rows)


@dataclass
class BlockPool:
    """Blocks of `block_rows` KV rows, `num_blocks` in all (block 0 is scratch), for `slots` sequences
    of up to `max_seq_len` rows. A slot's blocks back its rows [0, len(blocks) * block_rows).

    Prefix sharing: a block whose rows a prompt's prefill wrote is published under that prompt's
    tokens up to the block's end (`publish`); a later prompt with the same tokens there takes the
    block instead of a new one (`share`) and prefills only after it. Rows depend only on the tokens
    before them, so the shared rows are the ones it would have written, and no sharer writes them
    again (a sequence writes from its prompt's last position on). A published block nobody holds
    stays cached until a new block is needed (least recently released first)."""

    num_blocks: int
    block_rows: int
    slots: int
    max_seq_len: int
    owned: list[list[int]] = field(init=False)
    free: list[int] = field(init=False)
    reserved: list[int] = field(init=False)  # blocks each slot may still grow to (`reserve`)
    refs: dict[int, int] = field(init=False)  # holders of each block in use
    cached: dict[tuple[int, ...], int] = field(init=False)  # prompt prefix -> the block holding its last rows
    prefix_of: dict[int, tuple[int, ...]] = field(init=False)
    idle: dict[int, None] = field(init=False)  # cached blocks nobody holds, oldest first

    def __post_init__(self):
        check_block_rows(self.block_rows)
        if self.num_blocks < 2:
            raise MpkError(f"a KV pool needs at least 2 blocks (one is scratch), not {self.num_blocks}")
        self.owned = [[] for _ in range(self.slots)]
        self.reserved = [0] * self.slots
        self.free = list(range(self.num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out the lowest first
        self.refs, self.cached, self.prefix_of, self.idle = {}, {}, {}, {}

    @property
    def blocks_per_seq(self) -> int:
        return cdiv(self.max_seq_len, self.block_rows)

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds (a shared one once)."""
        return len(self.refs)

    @property
    def available(self) -> int:
        """Blocks a sequence can take: free ones, and cached ones nobody holds."""
        return len(self.free) + len(self.idle)

    def blocks_for(self, rows: int) -> int:
        return cdiv(max(0, rows), self.block_rows)

    @property
    def unpromised(self) -> int:
        """Free blocks no slot's reservation counts on."""
        return self.available - sum(max(0, r - len(o)) for r, o in zip(self.reserved, self.owned))

    def can_grow(self, slot: int, rows: int) -> bool:
        return self.blocks_for(rows) - len(self.owned[slot]) <= self.available

    def reserve(self, slot: int, rows: int) -> bool:
        """Promise `slot` the blocks of `rows` rows (its prompt and every token it may make), so that
        growing to them never fails; False, and nothing promised, when the unpromised blocks are too few."""
        want = self.blocks_for(min(rows, self.max_seq_len))
        extra = max(0, want - max(self.reserved[slot], len(self.owned[slot])))
        if extra > self.unpromised:
            return False
        self.reserved[slot] = max(self.reserved[slot], want)
        return True

    def grow(self, slot: int, rows: int) -> None:
        """Back rows [0, rows) of `slot` (rows past max_seq_len are never used and never backed)."""
        want = self.blocks_for(min(rows, self.max_seq_len))
        need = want - len(self.owned[slot])
        if need > self.available:
            raise MpkError(f"the KV cache has {self.available} free blocks of {self.block_rows} rows and sequence "
                           f"slot {slot} needs {need} more; fewer requests at once, or more GPU memory for the cache")
        for _ in range(max(0, need)):
            self.owned[slot].append(self._take())

    def _take(self) -> int:
        """A block for new rows: a free one, else the cached block released longest ago (forgotten)."""
        if self.free:
            block = self.free.pop()
        else:
            block = next(iter(self.idle))
            del self.idle[block], self.cached[self.prefix_of.pop(block)]
        self.refs[block] = 1
        return block

    def share(self, slot: int, tokens: list[int]) -> int:
        """Give an empty `slot` the cached blocks of `tokens`' longest published prefix that stays
        before its last token; return the rows they hold (the prefill starts there)."""
        if self.owned[slot]:
            raise MpkError(f"KV slot {slot} already holds blocks; share a prefix into an empty slot")
        for end in range(self.block_rows, len(tokens), self.block_rows):  # end <= len(tokens) - 1
            block = self.cached.get(tuple(tokens[:end]))
            if block is None:
                break
            self.idle.pop(block, None)
            self.refs[block] = self.refs.get(block, 0) + 1
            self.owned[slot].append(block)
        return len(self.owned[slot]) * self.block_rows

    def publish(self, slot: int, tokens: list[int], rows: int) -> None:
        """`slot`'s rows [0, rows) now hold `tokens`' K and V: offer its whole blocks among them to
        later prompts with the same tokens."""
        for i in range(min(rows, len(tokens)) // self.block_rows):
            prefix = tuple(tokens[:(i + 1) * self.block_rows])
            block = self.owned[slot][i]
            if prefix not in self.cached and block not in self.prefix_of:
                self.cached[prefix], self.prefix_of[block] = block, prefix

    def release(self, slot: int) -> None:
        """Give back every block of `slot`, and its reservation: a published block stays cached."""
        for block in reversed(self.owned[slot]):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                del self.refs[block]
                if block in self.prefix_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)
        self.owned[slot] = []
        self.reserved[slot] = 0

    def arrange(self, order: list[int]) -> None:
        """Slot i takes what slot order[i] held (blocks and reservation) and the slots after them are
        empty; `order` lists every slot that holds blocks or a reservation. No row moves."""
        kept = set(order)
        if len(kept) != len(order) or any(self.owned[s] or self.reserved[s] for s in range(self.slots) if s not in kept):
            raise MpkError(f"arranging KV slots as {order} would drop or repeat a slot's blocks")
        owned, reserved = [self.owned[s] for s in order], [self.reserved[s] for s in order]
        empty = self.slots - len(order)
        self.owned, self.reserved = owned + [[] for _ in range(empty)], reserved + [0] * empty

    def table(self, batch: int | None = None) -> torch.Tensor:
        """The block table of the first `batch` slots (all by default): int32 [batch, blocks_per_seq],
        the scratch block where a row is not backed."""
        batch = self.slots if batch is None else batch
        out = torch.full((batch, self.blocks_per_seq), SCRATCH_BLOCK, dtype=torch.int32)
        for slot in range(batch):
            blocks = self.owned[slot]
            if blocks:
                out[slot, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return out


def storage_shape(spec, kv_pages: KvPages | None) -> tuple[int, ...]:
    """The shape of a tensor's buffer: the tensor's own, or for a cache tensor [batch, max_seq_len,
    groups, head_dim] of a paged executor, its pool [num_blocks, block_rows, groups, head_dim]."""
    if kv_pages is None or spec.kind != "state":
        return spec.shape
    return (kv_pages.num_blocks, kv_pages.block_rows, *spec.shape[2:])


def physical_rows(table: torch.Tensor, block_rows: int, seqs: range, rows: range, device=None) -> torch.Tensor:
    """[len(seqs), len(rows)] flat pool rows (block * block_rows + offset) of logical rows `rows`
    of sequences `seqs`, on `device`."""
    r = torch.arange(rows.start, rows.stop)
    blocks = table.cpu()[seqs.start:seqs.stop][:, r // block_rows].long()
    return (blocks * block_rows + (r % block_rows)).to(device)


def gather(pool: torch.Tensor, table: torch.Tensor, box, idx: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of logical box (seqs, rows, groups, dims) of a paged cache. `idx`: the box's
    `physical_rows`, when the caller has them already (pools of one table share them)."""
    idx, inner = _box_rows(pool, table, box, idx)
    return pool.reshape(-1, *pool.shape[2:])[idx][inner]


def scatter(pool: torch.Tensor, table: torch.Tensor, box, values: torch.Tensor,
            idx: torch.Tensor | None = None) -> None:
    """Write `values` (the shape of logical box (seqs, rows, groups, dims)) into a paged cache
    (`idx` as for `gather`)."""
    idx, inner = _box_rows(pool, table, box, idx)
    flat = pool.view(-1, *pool.shape[2:])
    rows = flat[idx]
    rows[inner] = values
    flat[idx] = rows


def _box_rows(pool: torch.Tensor, table: torch.Tensor, box, idx: torch.Tensor | None):
    """A paged box's flat pool rows [seqs, rows] (`idx` when given) and the index of its
    (groups, dims) part within those rows."""
    (b0, b1), (r0, r1), *rest = box
    if idx is None:
        idx = physical_rows(table, pool.shape[1], range(b0, b1), range(r0, r1), pool.device)
    return idx, (slice(None), slice(None), *(slice(a, b) for a, b in rest))
