"""models/: checkpoint loading and validation, presets, weight fusion, and the reference model vs transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mpk.errors import MpkError
from mpk.graph import ROPE, build_decode_program, shard_of
from mpk.models import PRESETS, resolve_model
from mpk.models.checkpoint import check_checkpoint_header, expected_shapes, load_checkpoint
from mpk.models.config import ModelConfig
from mpk.inputs import fuse_weights
from mpk.models.presets import get_preset, random_weights
from mpk.models.reference import ReferenceModel
from mpk.models.tokenizer import load_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# (family, config overrides): every flag of ModelConfig appears in at least one case.
CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qknorm": ("qwen3", {"tie_word_embeddings": True}),
    "qwen3-untied": ("qwen3", {"num_key_value_heads": 1}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
}


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint):
    return {case: make_checkpoint(family, **overrides) for case, (family, overrides) in CASES.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- loading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_load_round_trips_every_tensor(checkpoints, case):
    path = checkpoints[case]
    cfg, weights = load_checkpoint(path)
    on_disk = load_file(str(path / "model.safetensors"))
    assert set(weights) == set(on_disk) == set(expected_shapes(cfg))
    for name, t in on_disk.items():
        assert torch.equal(weights[name], t), name
    family, overrides = CASES[case]
    assert cfg.family == family
    assert cfg.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.qk_norm == (family == "qwen3")
    assert (cfg.rope_scaling is not None) == (case == "llama3-rope")
    assert cfg.sliding_window == (8 if family == "mistral" else None)


def test_sharded_checkpoint_loads(make_checkpoint):
    single = make_checkpoint("qwen2", seed=3)
    sharded = make_checkpoint("qwen2", seed=3, max_shard_size="20KB")
    assert not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    _, a = load_checkpoint(single)
    _, b = load_checkpoint(sharded)
    assert set(a) == set(b)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_load_casts_to_dtype(checkpoints):
    _, weights = load_checkpoint(checkpoints["llama"], dtype=torch.bfloat16)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def copy_ckpt(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    d.update(changes)
    (path / "config.json").write_text(json.dumps(d))


def assert_error(fn, *fragments):
    with pytest.raises(MpkError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_directory(tmp_path):
    assert_error(lambda: load_checkpoint(tmp_path / "nope"), "no such checkpoint directory", "nope")


def test_no_weights_file(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["llama"], tmp_path)
    (path / "model.safetensors").unlink()
    assert_error(lambda: load_checkpoint(path), "model.safetensors", "download")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"])
    gpt2.save_pretrained(tmp_path)
    assert_error(lambda: load_checkpoint(tmp_path), "unsupported architecture", "GPT2LMHeadModel", "LlamaForCausalLM")


def test_shape_mismatch_after_editing_config(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["llama"], tmp_path)
    edit_config(path, intermediate_size=128)
    cfg = ModelConfig.from_dir(path)
    for fn in (lambda: load_checkpoint(path), lambda: check_checkpoint_header(path, cfg)):
        assert_error(fn, "model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[128, 64]")


def test_truncated_safetensors(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["llama"], tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_error(lambda: load_checkpoint(path), "model.safetensors", "truncated or corrupt")
    f.write_bytes(b"\x01\x02")
    assert_error(lambda: load_checkpoint(path), "model.safetensors", "truncated or corrupt")


def test_missing_tensor(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["qwen3-qknorm"], tmp_path)
    weights = load_file(str(path / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_norm.weight"]
    save_file(weights, str(path / "model.safetensors"))
    assert_error(lambda: load_checkpoint(path), "model.layers.1.self_attn.k_norm.weight")


def test_untied_checkpoint_without_lm_head(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["llama-tied"], tmp_path)
    edit_config(path, tie_word_embeddings=False)
    assert_error(lambda: load_checkpoint(path), "lm_head.weight")


def test_index_naming_a_missing_shard(make_checkpoint, tmp_path):
    path = make_checkpoint("llama", max_shard_size="20KB", path=tmp_path / "ckpt")
    sorted(path.glob("model-*.safetensors"))[1].unlink()
    assert_error(lambda: load_checkpoint(path), "names the shard", "missing")


def test_pytorch_bin_only(tmp_path, checkpoints):
    path = copy_ckpt(checkpoints["llama"], tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    assert_error(lambda: load_checkpoint(path), ".bin", "safetensors")


def test_header_check_reads_no_data(checkpoints, tmp_path):
    """Garbage tensor bytes pass the header check: it never reads them."""
    path = copy_ckpt(checkpoints["llama"], tmp_path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    f.write_bytes(data[:header_end] + b"\xff" * (len(data) - header_end))
    check_checkpoint_header(path, ModelConfig.from_dir(path))


# --- resolve_model, presets, tokenizer --------------------------------------------------------------

def test_resolve_checkpoint(make_checkpoint):
    path = make_checkpoint("llama", tokenizer=True)
    src = resolve_model(str(path))
    assert src.path == path and src.cfg.family == "llama"
    src.check()
    weights = src.load_weights(torch.float32)
    assert set(weights) == set(expected_shapes(src.cfg))
    tok = src.tokenizer()
    ids = tok.encode("the cat and the dog", add_special_tokens=False)
    assert len(ids) == 5 and max(ids) < src.cfg.vocab_size
    assert tok.decode(ids) == "the cat and the dog"


def test_resolve_preset_and_unknown():
    src = resolve_model("tiny")
    assert src.path is None and src.tokenizer() is None
    src.check()
    weights = src.load_weights(torch.float32)
    assert {n: tuple(t.shape) for n, t in weights.items()} == expected_shapes(src.cfg)
    assert_error(lambda: resolve_model("no-such-model"), "no such checkpoint directory or preset 'no-such-model'",
                 "llama-3.1-8b")
    assert_error(lambda: get_preset("gpt-5"), "unknown preset", "qwen3-8b")


def test_no_tokenizer_and_corrupt_tokenizer(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["llama"], tmp_path)
    assert load_tokenizer(path) is None
    (path / "tokenizer.json").write_text("{ this is not json")
    (path / "tokenizer_config.json").write_text("{}")
    assert_error(lambda: load_tokenizer(path), "tokenizer", str(path))


# Published parameter counts (embeddings included, tied counted once).
PRESET_PARAMS = {"llama-3.2-1b": 1.236e9, "llama-3.2-3b": 3.213e9, "llama-3.1-8b": 8.030e9, "qwen3-0.6b": 0.596e9,
                 "qwen3-1.7b": 1.721e9, "qwen3-4b": 4.022e9, "qwen3-8b": 8.191e9, "qwen2.5-7b": 7.616e9,
                 "mistral-7b": 7.248e9, "qwen3-32b": 32.8e9, "llama-3.1-70b": 70.6e9}


def test_presets_have_published_sizes():
    for name, params in PRESET_PARAMS.items():
        cfg = PRESETS[name]
        assert cfg.name == name
        assert abs(cfg.num_params() - params) / params < 0.01, (name, cfg.num_params())
        build_decode_program(cfg, 1, 64, tp_size=2)


def test_random_weights_are_seeded():
    cfg = PRESETS["tiny"]
    a, b = random_weights(cfg, seed=1), random_weights(cfg, seed=1)
    c = random_weights(cfg, seed=2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert a["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert 0.015 < a["model.layers.0.mlp.up_proj.weight"].float().std() < 0.025
    assert torch.all(a["model.norm.weight"] == 1)


# --- fusion ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama", "llama-tied", "qwen2-bias", "qwen3-qknorm"])
@pytest.mark.parametrize("tp", [1, 2])
def test_fused_weights_match_program(checkpoints, case, tp):
    cfg, hf = load_checkpoint(checkpoints[case])
    fused = fuse_weights(cfg, hf, tp, torch.bfloat16)
    prog = build_decode_program(cfg, 1, 64, tp)
    want = {n: t.shape for n, t in prog.tensors.items() if t.kind == "weight" and n.rsplit("/", 1)[-1] != ROPE}
    assert {n: tuple(t.shape) for n, t in fused.items()} == want
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in fused.values())


def test_fused_layout(checkpoints):
    cfg, hf = load_checkpoint(checkpoints["qwen2-bias"])
    hd, q = cfg.head_dim, cfg.q_per_kv
    a = "model.layers.1.self_attn."
    wq, wk, wv = (hf[f"{a}{x}_proj.weight"] for x in "qkv")
    group1 = torch.cat([wq[q * hd:2 * q * hd], wk[hd:2 * hd], wv[hd:2 * hd]])
    fused1 = fuse_weights(cfg, hf, 1, torch.float32)
    rows = cfg.qkv_rows_per_group
    assert torch.equal(fused1["layers.1.qkv"][rows:2 * rows], group1)
    fused2 = fuse_weights(cfg, hf, 2, torch.float32)
    assert torch.equal(fused2["rank1/layers.1.qkv"], group1)
    bias1 = torch.cat([hf[a + "q_proj.bias"][q * hd:2 * q * hd], hf[a + "k_proj.bias"][hd:2 * hd],
                       hf[a + "v_proj.bias"][hd:2 * hd]])
    assert torch.equal(fused2["rank1/layers.1.qkv_bias"], bias1)
    assert torch.equal(fused2["rank1/layers.1.o"], hf[a + "o_proj.weight"][:, 2 * hd:])
    m = "model.layers.1.mlp."
    sh = shard_of(cfg, 1, 2)
    gate_up = fused2["rank1/layers.1.gate_up"]
    assert torch.equal(gate_up[0::2], hf[m + "gate_proj.weight"][sh.intermediate:])
    assert torch.equal(gate_up[1::2], hf[m + "up_proj.weight"][sh.intermediate:])
    assert torch.equal(fused2["rank1/layers.1.down"], hf[m + "down_proj.weight"][:, sh.intermediate:])
    assert torch.equal(fused2["rank1/lm_head"], hf["lm_head.weight"][sh.vocab_start:sh.vocab_stop])
    assert torch.equal(fused2["rank0/embed"], hf["model.embed_tokens.weight"])


def test_fused_lm_head_of_tied_model_is_embedding(checkpoints):
    cfg, hf = load_checkpoint(checkpoints["llama-tied"])
    fused = fuse_weights(cfg, hf, 2, torch.float32)
    sh = shard_of(cfg, 1, 2)
    assert torch.equal(fused["rank1/lm_head"], hf["model.embed_tokens.weight"][sh.vocab_start:sh.vocab_stop])


# --- reference model vs transformers -----------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_reference_logits_match_transformers(checkpoints, load_hf_model, case):
    path = checkpoints[case]
    cfg, hf_weights = load_checkpoint(path)
    hf_model = load_hf_model(path)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf_model(tokens).logits.float()
    ref = ReferenceModel(cfg, hf_weights, torch.float32, "cpu")
    ref.reset(2, 24)
    # Prefill 12 tokens, then decode the rest one at a time (teacher-forced) through the KV cache.
    prefill = ref(tokens[:, :12], 0)
    assert rel_err(prefill, want[:, :12]) < 1e-4
    for pos in range(12, 20):
        step = ref.decode_step(tokens[:, pos], pos)
        assert rel_err(step, want[:, pos]) < 1e-4, pos
    # Per-sequence positions: rerun the last token of each row at its own position.
    step = ref.decode_step(tokens[:, 19], torch.tensor([19, 19]))
    assert rel_err(step, want[:, 19]) < 1e-4


@pytest.mark.parametrize("case", ["llama3-rope", "qwen2-bias", "qwen3-qknorm", "mistral-window"])
def test_greedy_generate_matches_transformers(checkpoints, load_hf_model, case):
    path = checkpoints[case]
    cfg, hf_weights = load_checkpoint(path)
    hf_model = load_hf_model(path)
    hf_model.generation_config.eos_token_id = None  # greedy_generate never stops early
    hf_model.generation_config.pad_token_id = 0
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 8]])
    want = hf_model.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1]:]
    ref = ReferenceModel(cfg, hf_weights, torch.float32, "cpu")
    assert ref.greedy_generate(prompt[0].tolist(), 16).tolist() == want.tolist()


def test_reference_cache_too_small(checkpoints):
    cfg, hf_weights = load_checkpoint(checkpoints["llama"])
    ref = ReferenceModel(cfg, hf_weights)
    ref.reset(1, 8)
    assert_error(lambda: ref(torch.zeros(1, 9, dtype=torch.long), 0), "reset()")


def test_reference_bfloat16_runs(checkpoints):
    cfg, hf_weights = load_checkpoint(checkpoints["qwen3-qknorm"])
    ref32 = ReferenceModel(cfg, hf_weights, torch.float32)
    ref16 = ReferenceModel(cfg, hf_weights, torch.bfloat16)
    tokens = torch.arange(10)[None]
    for ref in (ref32, ref16):
        ref.reset(1, 16)
    out32, out16 = ref32(tokens, 0), ref16(tokens, 0)
    assert out16.dtype == torch.float32
    assert rel_err(out16, out32) < 0.05
