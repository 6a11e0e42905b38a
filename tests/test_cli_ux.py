"""What a first run shows: what the model and prompt were, progress for slow phases, --quiet, --version,
defaults in --help, and a light `import mpk` / `mpk --help`."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys

import pytest

import mpk
from mpk import progress
from mpk.cli import _parser
from test_cli import run_cli


def test_default_run_says_weights_are_random_and_what_the_prompt_was(capsys):
    code, out, err = run_cli(capsys, "generate", "tiny", "--max-new-tokens", "3", "--ignore-eos")
    assert code == 0
    assert "random weights" in err and "token ids 1,2,3,4" in err and "default" in err
    assert "tokens/s" in err.splitlines()[-1]
    assert out.startswith("tiny: ") and len(out.split(":", 1)[1].split()) == 3


def test_quiet_prints_results_only(capsys):
    code, out, err = run_cli(capsys, "generate", "tiny", "--max-new-tokens", "3", "--quiet")
    assert code == 0 and err == "" and out.startswith("tiny: ")


def test_slow_phases_report_progress_on_stderr(capsys, monkeypatch, make_checkpoint):
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)  # every phase counts as slow
    ckpt = make_checkpoint("llama")
    argv = ("generate", str(ckpt), "--token-ids", "1,2", "--max-new-tokens", "4", "--ignore-eos", "--json")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0
    assert "mpk: loading weights: " in err and "/s" in err
    assert "mpk: compiling the decode step and reading the prompt (2 tokens): " in err
    assert "mpk: generating: " in err and "tok/s" in err
    assert run_cli(capsys, *argv, "--quiet")[2] == ""
    code, _, err = run_cli(capsys, "inspect", "tiny", "--num-sms", "8")
    assert "mpk: compiling and verifying the task graph: " in err


def test_phase_draws_a_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "_enabled", True)
    with progress.phase("generating", total=4, unit="tok") as p:
        for _ in range(4):
            p.update(1)
    with progress.phase("a short phase"):
        pass
    assert "generating: 100%" in term.getvalue() and "4/4" in term.getvalue()
    assert "a short phase [" in term.getvalue()


def test_fast_phases_and_library_calls_print_nothing(capsys, monkeypatch):
    with progress.phase("library call"):  # progress is off unless the CLI turns it on
        pass
    progress.enable()
    try:
        with progress.phase("quick"):
            pass
    finally:
        progress.enable(False)
    assert capsys.readouterr().err == ""


def test_nvcc_build_reports_progress(capsys, monkeypatch, tmp_path):
    from mpk.runtime import build as build_mod

    nvcc = tmp_path / "nvcc"  # stands in for nvcc: prints a version, or writes the -o file
    nvcc.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo fake nvcc 12.8; exit 0; }\n'
                    'while [ $# -gt 1 ]; do [ "$1" = -o ] && : > "$2"; shift; done\n')
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDACXX", str(nvcc))
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    progress.enable()
    try:
        so = build_mod.build("// a kernel", "sm_90a", cache=tmp_path / "cache")
    finally:
        progress.enable(False)
    assert so.exists()
    assert "mpk: building the megakernel for sm_90a with nvcc" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "--version")
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mpk {mpk.__version__}"


def test_every_option_shows_its_default_in_help():
    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.default in (None, argparse.SUPPRESS) or not action.option_strings:
                continue
            shown = f"(default: {action.default})" in text or "default" in (action.help or "")
            assert shown, f"mpk {name} {action.option_strings[0]}: default {action.default!r} not in its help"
    assert "default 1,2,3,4" in " ".join(subparsers.choices["generate"].format_help().split())


@pytest.mark.parametrize("code", [
    "import mpk",
    "import mpk.cli, sys\ntry:\n    mpk.cli.main(['generate', '--help'])\nexcept SystemExit:\n    pass",
    "import mpk.cli, sys\ntry:\n    mpk.cli.main(['--version'])\nexcept SystemExit:\n    pass",
])
def test_import_and_help_stay_light(code):
    probe = code + "\nimport sys\nprint(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'tqdm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
