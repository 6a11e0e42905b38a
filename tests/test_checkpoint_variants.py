"""Checkpoints as users bring them: each variant loads (and generates what transformers does) or gets one
clear line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_model_from
from mpk.models import resolve_model
from mpk.models.checkpoint import INDEX_FILE, load_checkpoint
from test_cli import assert_one_line_error, run_cli

NEW = 6


def generate_json(capsys, ckpt, *extra):
    code, out, err = run_cli(capsys, "generate", str(ckpt), "--token-ids", "3,4,5", "--max-new-tokens", str(NEW),
                             "--json", "--dtype", "float32", *extra)
    assert code == 0, err
    return json.loads(out)["token_ids"], err


def hf_greedy(ckpt, prompt=(3, 4, 5), new=NEW) -> list[int]:
    model = hf_model_from(ckpt)
    out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=new, do_sample=False, min_new_tokens=new,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_float16_checkpoint_generates_what_transformers_does(capsys, make_checkpoint):
    ckpt = make_checkpoint("qwen3", dtype=torch.float16)
    ids, _ = generate_json(capsys, ckpt, "--ignore-eos")
    assert ids == hf_greedy(ckpt)  # float32 computation on the exact float16 weights
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--token-ids", "3", "--max-new-tokens", "1")
    assert code == 0 and "float16 weights" in err and "--dtype float32" in err  # bfloat16 rounds them: say so


def test_missing_torch_dtype_loads(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama")
    cfg = json.loads((ckpt / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        cfg.pop(key, None)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    ids, _ = generate_json(capsys, ckpt, "--ignore-eos")
    assert ids == hf_greedy(ckpt)


def test_several_eos_ids_in_generation_config(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama", eos_token_id=None)
    free, _ = generate_json(capsys, ckpt, "--ignore-eos")
    never = next(t for t in range(128) if t not in free)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [never, free[3], free[2]]}))
    assert resolve_model(str(ckpt)).cfg.eos_token_ids == tuple(dict.fromkeys([never, free[3], free[2]]))
    stopped, _ = generate_json(capsys, ckpt)
    first = min(free.index(free[2]), free.index(free[3]))
    assert stopped == free[:first + 1]


def test_eos_ids_of_config_and_generation_config_combine(make_checkpoint):
    ckpt = make_checkpoint("llama", eos_token_id=2)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2, 9]}))
    assert resolve_model(str(ckpt)).cfg.eos_token_ids == (2, 5, 9)


@pytest.mark.parametrize("content, phrase", [
    ('{"eos_token_id": "</s>"}', "eos_token_id '</s>'"),
    ('{"eos_token_id": [1, [2]]}', "eos_token_id [1, [2]]"),
    ("{ not json", "not readable JSON"),
    ("[1, 2]", "does not hold a JSON object"),
])
def test_malformed_generation_config_is_one_line(capsys, make_checkpoint, content, phrase):
    ckpt = make_checkpoint("llama")
    (ckpt / "generation_config.json").write_text(content)
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_line_error(code, err, "generation_config.json", phrase)


@pytest.fixture
def sharded(make_checkpoint):
    ckpt = make_checkpoint("llama", max_shard_size="40KB")
    index = json.loads((ckpt / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    return ckpt, index


def write_index(ckpt, index):
    (ckpt / INDEX_FILE).write_text(json.dumps(index))


def test_index_that_forgets_a_tensor_still_loads_it(capsys, sharded, make_checkpoint):
    ckpt, index = sharded
    reference = hf_greedy(ckpt)
    del index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    write_index(ckpt, index)
    _, weights = load_checkpoint(ckpt)
    assert "model.layers.1.self_attn.k_proj.weight" in weights
    ids, _ = generate_json(capsys, ckpt, "--ignore-eos")
    assert ids == reference


def test_index_naming_a_missing_shard_is_one_line(capsys, sharded):
    ckpt, index = sharded
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    write_index(ckpt, index)
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--token-ids", "1")
    assert_one_line_error(code, err, "model-00099-of-00099.safetensors", "missing")


def test_missing_shard_file_is_one_line(capsys, sharded):
    ckpt, index = sharded
    shard = index["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    (ckpt / shard).unlink()
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--token-ids", "1")
    assert_one_line_error(code, err, shard, "missing", "download")


def test_index_placing_a_tensor_in_the_wrong_shard_is_one_line(capsys, sharded):
    ckpt, index = sharded
    shards = sorted(set(index["weight_map"].values()))
    name = "model.layers.0.mlp.up_proj.weight"
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    write_index(ckpt, index)
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_line_error(code, err, name, "different downloads")


def test_tensor_in_no_shard_is_one_line(capsys, sharded):
    ckpt, index = sharded
    from safetensors.torch import load_file, save_file

    name = "model.layers.1.mlp.down_proj.weight"
    shard = ckpt / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    write_index(ckpt, index)
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--token-ids", "1")
    assert_one_line_error(code, err, "lacks the tensor", name)
