"""Inputs that used to end in a traceback or a misleading message: each is now one line, exit 2,
and nothing on stdout."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file, save_file

from mpk.errors import MpkError
from mpk.models.checkpoint import load_checkpoint
from mpk.runtime import build as build_mod
from test_cli import assert_one_line_error, run_cli


@pytest.mark.parametrize("value, bad", [(float("nan"), "NaN"), (float("inf"), "infinite")])
@pytest.mark.parametrize("which", ["all", "one"])
def test_nan_or_infinite_weights(capsys, make_checkpoint, value, bad, which):
    ckpt = make_checkpoint("llama", tokenizer=True)
    weights = load_file(ckpt / "model.safetensors")
    for name in weights if which == "all" else ["model.layers.1.mlp.down_proj.weight"]:
        weights[name].view(-1)[0 if which == "one" else slice(None)] = value
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MpkError, match=bad):
        load_checkpoint(ckpt)
    code, out, err = run_cli(capsys, "generate", str(ckpt), "--token-ids", "1,2", "--max-new-tokens", "2", "--quiet")
    assert_one_line_error(code, err, bad, "model.safetensors", "re-download")
    assert out == ""


@pytest.mark.parametrize("argv, phrase", [
    (("inspect", "qwen3-8b", "--num-sms", "1000000"), "--num-sms must be between 1 and 1024, not 1000000"),
    (("inspect", "tiny", "--num-sms", "0"), "--num-sms must be between 1"),
    (("inspect", "tiny", "--tp", "0"), "--tp must be at least 1, not 0"),
    (("inspect", "tiny", "--batch", "0"), "--batch must be between 1"),
    (("inspect", "tiny", "--max-seq-len", "-5"), "--max-seq-len must be at least 1"),
    (("generate", "tiny", "--tp", "0"), "--tp must be at least 1, not 0"),
    (("generate", "tiny", "--tp", "-2"), "--tp must be at least 1"),
    (("generate", "tiny", "--num-sms", "5000"), "--num-sms must be between 1 and 1024"),
    (("generate", "tiny", "--max-new-tokens", "-1"), "--max-new-tokens must be at least 1"),
    (("bench", "tiny", "--steps", "0"), "--steps must be at least 1"),
    (("bench", "tiny", "--tp", "0"), "--tp must be at least 1, not 0"),
    (("bench", "tiny", "--prompt-len", "-3"), "--prompt-len must be at least 1, not -3"),
    (("bench", "tiny", "--temperature", "-1"), "temperature must be 0 (greedy) or more"),
    (("bench", "tiny", "--backends", "mpk-graph"), "use it with --prompt-len"),
    (("bench", "tiny", "--kv-block-rows", "-1"), "--kv-block-rows must be at least 0, not -1"),
    (("bench", "tiny", "--kv-block-rows", "16", "--prompt-len", "8"), "runs with a contiguous one"),
    (("bench-op", "tiny", "--prefill", "-2"), "--prefill must be 0 (the decode graph) or a chunk of 1 or more positions, not -2"),
    (("bench", "tiny", "--temperature", "1", "--top-p", "0"), "top_p must be in (0, 1]"),
    (("build", "tiny", "--tp", "3"), "does not divide over tensor-parallel size 3"),
    (("build", "tiny", "--batch", "0"), "--batch must be between 1"),
    (("build", "tiny", "--batch", "16", "--matmul-inputs", "float32"), "float32 matrix-product inputs run up to batch 8"),
    (("generate", "tiny", "--token-ids", "1,,2"), "empty entry"),
    (("generate", "tiny", "--token-ids", "1,2,"), "empty entry"),
    (("generate", "tiny", "--token-ids", ""), "at least one token id"),
    (("generate", "tiny", "--token-ids", "-1,2"), "token ids are 0 or more, but --token-ids '-1,2' has -1"),
    (("generate", "tiny", "--token-ids=-1,2"), "token ids are 0 or more, but --token-ids '-1,2' has -1"),
    (("generate", "tiny", "--token-ids", "3", "--token-ids", "-7"), "has -7"),
    (("generate", "tiny", "--token-ids", "1.5"), "comma-separated integers"),
    (("generate", "tiny", "--frobnicate"), "unrecognized arguments: --frobnicate"),
    (("generate", "tiny", "--backend", "tpu"), "invalid choice: 'tpu'"),
])
def test_bad_arguments_are_one_line_before_any_output(capsys, argv, phrase):
    code, out, err = run_cli_catching_exit(capsys, *argv)
    assert_one_line_error(code, err, phrase)
    assert out == ""


def run_cli_catching_exit(capsys, *argv):
    """run_cli, also for usage errors, which argparse raises as SystemExit."""
    try:
        return run_cli(capsys, *argv)
    except SystemExit as e:
        out, err = capsys.readouterr()
        return e.code, out, err


def test_huge_num_sms_is_refused_quickly(capsys):
    import time

    t0 = time.perf_counter()
    run_cli(capsys, "inspect", "qwen3-8b", "--num-sms", "1000000")
    assert time.perf_counter() - t0 < 5


def test_negative_prompt_text_is_not_taken_for_an_option(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama", tokenizer=True)
    code, out, err = run_cli(capsys, "generate", str(ckpt), "--prompt", "-the cat", "--max-new-tokens", "2",
                             "--ignore-eos", "--quiet")
    assert code == 0, err


@pytest.fixture
def cache_env(monkeypatch, tmp_path):
    def point_at(path):
        monkeypatch.setenv("MPK_CACHE_DIR", str(path))
        return path
    return point_at


def test_cache_dir_that_is_a_file(capsys, cache_env, tmp_path):
    file = cache_env(tmp_path / "a-file")
    file.write_text("not a directory")
    with pytest.raises(MpkError, match="is a file"):
        build_mod.writable_cache()
    code, out, err = run_cli(capsys, "build", "tiny")
    assert_one_line_error(code, err, str(file), "MPK_CACHE_DIR")
    assert out == ""


def test_cache_dir_under_a_file(capsys, cache_env, tmp_path):
    (tmp_path / "a-file").write_text("")
    cache_env(tmp_path / "a-file" / "cache")
    code, _, err = run_cli(capsys, "build", "tiny")
    assert_one_line_error(code, err, "a-file/cache", "MPK_CACHE_DIR")


def test_read_only_cache_dir(capsys, cache_env, tmp_path, monkeypatch):
    ro = cache_env(tmp_path / "ro")
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permission bits: report the directory as read-only instead
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    try:
        with pytest.raises(MpkError, match="read-only"):
            build_mod.writable_cache()
        code, out, err = run_cli(capsys, "build", "tiny")
        assert_one_line_error(code, err, "read-only", "MPK_CACHE_DIR")
    finally:
        ro.chmod(0o755)


def test_build_reports_an_unwritable_cache_during_the_build(tmp_path, monkeypatch):
    """Permissions can change under a check: an OSError while writing is still one line."""
    fake_nvcc = tmp_path / "nvcc"
    fake_nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8'\n")
    fake_nvcc.chmod(0o755)
    monkeypatch.setenv("CUDACXX", str(fake_nvcc))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(build_mod, "_compile", refuse)
    with pytest.raises(MpkError, match="Permission denied"):
        build_mod.build("// kernel", cache=tmp_path / "cache")
