"""The server's Prometheus metrics, in a registry of its own (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; the CPU executor is far slower than a GPU, so the buckets reach into seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, worker):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mpk_requests", "HTTP requests to the generation endpoints, by outcome",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mpk_prompt_tokens", "prompt tokens of completed generations", registry=r)
        self.generation_tokens = Counter("mpk_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("mpk_time_to_first_token_seconds", "from the request's arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("mpk_time_per_output_token_seconds", "mean time between a request's tokens after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        waiting = Gauge("mpk_requests_waiting", "requests queued for the engine", registry=r)
        waiting.set_function(lambda: worker.waiting)
        running = Gauge("mpk_requests_running", "requests the engine is generating", registry=r)
        running.set_function(lambda: worker.running)
        # Unpaged, the KV cache is max_seq_len rows per batch slot and the rows in use are the running
        # requests' positions; paged (--kv-block-rows), it is blocks the requests take as they grow.
        slots = Gauge("mpk_kv_slots", "sequence slots of the batch", registry=r)
        slots.set_function(lambda: len(worker.batcher.slots))
        rows = Gauge("mpk_kv_rows_in_use", "KV cache rows the running requests hold", registry=r)
        rows.set_function(lambda: worker.batcher.kv_rows_in_use())
        # Where the engine's time goes: prompts, decode steps, and the host's work around them.
        engine = Gauge("mpk_engine_seconds", "seconds of the engine's windows, by what they did", ["phase"],
                       registry=r)
        spent = worker.batcher.time
        engine.labels("window").set_function(lambda: spent.window)
        engine.labels("prefill").set_function(lambda: spent.prefill)
        engine.labels("decode").set_function(lambda: spent.decode)
        prefilled = Gauge("mpk_prefill_rows", "prompt rows prefilled (rows a shared prefix held are not counted)",
                          registry=r)
        prefilled.set_function(lambda: spent.prefill_rows)
        passes = Gauge("mpk_prefill_passes", "prefill passes over prompt chunks, by how: replayed as a CUDA "
                       "graph (captured: those that first captured their shape) or run op by op", ["how"], registry=r)
        replays = worker.batcher.replays
        passes.labels("replayed").set_function(lambda: replays.replayed)
        passes.labels("captured").set_function(lambda: replays.captured)
        passes.labels("eager").set_function(lambda: replays.eager)
        steps = Gauge("mpk_decode_steps", "decode steps the kernel ran", registry=r)
        steps.set_function(lambda: spent.steps)
        slot_steps = Gauge("mpk_decode_slot_steps", "decode steps x the batch each ran, by whether a request "
                           "held the slot", ["slot"], registry=r)
        slot_steps.labels("busy").set_function(lambda: spent.busy_slot_steps)
        slot_steps.labels("all").set_function(lambda: spent.slot_steps)
        pool = worker.batcher.pool
        if pool is not None:
            blocks = Gauge("mpk_kv_blocks", "blocks of the paged KV cache (one is scratch)", registry=r)
            blocks.set(pool.num_blocks)
            in_use = Gauge("mpk_kv_blocks_in_use", "KV cache blocks the running requests hold", registry=r)
            in_use.set_function(lambda: worker.batcher.kv_blocks_in_use())

    def observe_generation(self, arrived: float, prompt_tokens: int, token_times: list[float]) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(len(token_times))
        if token_times:
            self.ttft.observe(token_times[0] - arrived)
        if len(token_times) > 1:
            self.tpot.observe((token_times[-1] - token_times[0]) / (len(token_times) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
