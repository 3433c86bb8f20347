"""cli.py: the `rnnlm` subcommands, their exit codes and one-line messages for every bad input.

Most tests call `main([...])` and read capsys; a few run the real console entry in a subprocess
to show there is no traceback and that the inference path never imports torch or lightning.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

from rnnlm import cli, export, inference, ngram
from rnnlm import text as text_module
from rnnlm.cache import CacheSettings
from rnnlm.cli import SUBCOMMANDS, build_parser, main
from rnnlm.inference import (
    CACHE_KEY,
    NGRAM_KEY,
    LanguageModel,
    cache_metadata,
    ngram_metadata,
)
from rnnlm.ngram import NgramSettings
from rnnlm.text import decode_document
from tests.unit.test_export import one_torch_thread  # noqa: F401 (autouse)
from tests.unit.test_inference import identity_model

TEXT = "The president said that we will build a strong nation. Today congress must keep peace."


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate(tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_onnx_model), "--prompt", "the president", "--seed", "1"]
    code, out, err = run_cli(capsys, *args, "--max-tokens", "20")
    assert code == 0 and err == ""
    assert out.startswith("The president ") and out.count("\n") == 1
    assert run_cli(capsys, *args, "--max-tokens", "20")[1] == out  # same seed, same text
    code, out, _ = run_cli(
        capsys, *args, "--num-samples", "3", "--top-k", "5", "--top-p", "0.9",
        "--temperature", "0.7", "--stop-at-eos",
    )  # fmt: skip
    assert code == 0 and len(out.splitlines()) == 3


def test_generate_greedy(tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_onnx_model), "--temperature", "0", "--max-tokens", "8"]
    code, first, _ = run_cli(capsys, *args, "--seed", "1")
    assert code == 0 and run_cli(capsys, *args, "--seed", "2")[1] == first


def test_score_file_and_stdin(
    tiny_onnx_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text_file = tmp_path / "speech.txt"
    text_file.write_text(TEXT)
    code, out, _ = run_cli(
        capsys, "score", "--model", str(tiny_onnx_model), "--json", str(text_file)
    )
    result = json.loads(out)
    assert code == 0 and result["tokens"] == 19 and result["ppl"] > 1
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode())))
    code, out, _ = run_cli(capsys, "score", "--model", str(tiny_onnx_model), "--per-sentence", "-")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert lines[1].endswith("Today congress must keep peace.")
    assert lines[2].startswith(f"perplexity {result['ppl']:.2f} over 19 tokens")


# Paragraphs with CRLF line ends and multi-byte characters, several scoring windows long.
SPEECH = (
    "The president said that we will build a strong nation.\r\nToday congress must keep "
    "peace. Na\u00efve caf\u00e9!\r\n\r\nWe will build.\r\n"
).encode() * 30


def without_seconds(out: str) -> dict:
    result = json.loads(out)
    assert result.pop("seconds") >= 0
    return result


def test_score_streams_a_file_and_stdin_alike(
    tiny_onnx_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "speech.txt"
    path.write_bytes(SPEECH)
    expected = LanguageModel(tiny_onnx_model).score(decode_document(SPEECH))
    model = ["score", "--model", str(tiny_onnx_model)]
    code, out, err = run_cli(capsys, *model, "--json", str(path))
    assert code == 0 and err == ""
    result = without_seconds(out)
    assert list(result) == ["ppl", "nll", "mean_nll", "tokens", "unknown", "bytes"]
    assert result["bytes"] == len(SPEECH)
    assert (result["tokens"], result["unknown"]) == (expected.tokens, expected.unknown) == (840, 90)
    assert result["ppl"] == pytest.approx(expected.ppl, rel=1e-9)
    for args in (["--json"], []):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(SPEECH)))
        code, from_stdin, err = run_cli(capsys, *model, *args, "-")
        assert code == 0 and err == ""
        if args:
            assert without_seconds(from_stdin) == result
        else:
            assert from_stdin == run_cli(capsys, *model, str(path))[1]
            assert from_stdin == (
                f"perplexity {expected.ppl:.2f} over 840 tokens "
                f"({expected.mean_nll:.4f} nats/token, 90 unknown)\n"
            )


def test_score_rows(
    tiny_onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--rows N scores segments side by side: the API's batched result; out of range, exit 2."""
    path = tmp_path / "speech.txt"
    path.write_bytes(SPEECH * 4)
    expected = LanguageModel(tiny_onnx_model).score(decode_document(SPEECH * 4), rows=4)
    code, out, err = run_cli(
        capsys, "score", "--model", str(tiny_onnx_model), "--rows", "4", "--json", str(path)
    )
    assert code == 0 and err == ""
    assert json.loads(out)["ppl"] == pytest.approx(expected.ppl, rel=1e-9)
    code, out, err = run_cli(capsys, "score", "--model", str(tiny_onnx_model), "--rows", "0", "-")
    assert code == 2 and out == "" and "argument --rows: must be >= 1 and <= 16, got 0" in err


def test_score_per_sentence_as_text_and_as_json(
    tiny_onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "speech.txt"
    path.write_bytes(SPEECH)
    expected = LanguageModel(tiny_onnx_model).score(decode_document(SPEECH))
    model = ["score", "--model", str(tiny_onnx_model), "--per-sentence"]
    code, out, err = run_cli(capsys, *model, str(path))
    lines = out.splitlines()
    assert code == 0 and err == "" and len(lines) == len(expected.sentences) + 1 == 121
    assert lines[:3] == [f"{s.ppl:10.2f}  {s.tokens:5d}  {s.text}" for s in expected.sentences[:3]]
    assert lines[1].endswith("Today congress must keep peace.")
    assert lines[-1].startswith(f"perplexity {expected.ppl:.2f} over 840 tokens")
    code, out, err = run_cli(capsys, *model, "--json", str(path))
    assert code == 0 and err == "" and out.count("\n") == 1
    result = without_seconds(out)
    assert list(result)[-2:] == ["bytes", "sentences"]
    wanted = expected.to_dict(per_sentence=True)
    assert [(s["text"], s["tokens"]) for s in result["sentences"]] == [
        (s["text"], s["tokens"]) for s in wanted["sentences"]
    ]
    for got, sentence in zip(result["sentences"], wanted["sentences"], strict=True):
        assert got["nll"] == pytest.approx(sentence["nll"], rel=1e-9)
        assert got["ppl"] == pytest.approx(sentence["ppl"], rel=1e-9)


def test_score_tells_a_terminal_its_throughput(
    tiny_onnx_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a terminal gets it (stderr stays empty for scripts); --json has bytes and seconds."""
    path = tmp_path / "speech.txt"
    path.write_bytes(SPEECH)
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: stream is sys.stderr)
    code, out, err = run_cli(capsys, "score", "--model", str(tiny_onnx_model), str(path))
    assert code == 0 and out.startswith("perplexity ") and out.count("\n") == 1
    assert re.fullmatch(
        r"rnnlm: scored 3\.6 kB in \d+ s \([\d.e+]+ MB/min, [\d,]+ tokens/s\)\n", err
    ), err
    code, out, err = run_cli(capsys, "score", "--model", str(tiny_onnx_model), "--json", str(path))
    assert code == 0 and err == "" and json.loads(out)["bytes"] == len(SPEECH)


def test_progress_line_on_a_terminal() -> None:
    now = [100.0]
    out = io.StringIO()
    progress = cli._Progress(out, total=20_000_000, clock=lambda: now[0])
    progress(1_000_000, 100)
    assert out.getvalue() == ""  # nothing for the first 2 s: a short input shows no progress
    now[0] += 60.0
    progress(5_000_000, 900_000)
    assert out.getvalue() == (
        "\rrnnlm: scoring: 5.0 MB of 20.0 MB (25%), 900,000 tokens, 1 min 00 s, 5 MB/min\x1b[K"
    )
    progress(6_000_000, 1_000_000)  # within a second of the last line: not redrawn
    progress.clear()
    assert out.getvalue().endswith("\r\x1b[K")


def test_score_decodes_a_long_input_as_a_stream(
    tiny_onnx_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the sniffed head (SNIFF_BYTES, here 64), a byte that is not UTF-8 starts Latin-1."""
    monkeypatch.setattr(inference, "READ_BYTES", 16)
    monkeypatch.setattr(text_module, "SNIFF_BYTES", 64)
    head = "We will build a strong nation, na\u00efve caf\u00e9.\n".encode() * 2
    data = head + "Today caf\u00e9 \u00e9t\u00e9.\n".encode("latin-1")
    path = tmp_path / "mixed.txt"
    path.write_bytes(data)
    code, out, err = run_cli(capsys, "score", "--model", str(tiny_onnx_model), "--json", str(path))
    assert code == 0 and err == (
        f"rnnlm: warning: {path}: byte {len(head) + 9} is not UTF-8 (the first 64 bytes were): "
        "read as Latin-1 from there\n"
    )
    expected = LanguageModel(tiny_onnx_model).score(
        head.decode() + data[len(head) :].decode("latin-1")
    )
    assert json.loads(out)["ppl"] == pytest.approx(expected.ppl, rel=1e-9)


def test_next(tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "next", "--model", str(tiny_onnx_model), "--prompt", "we", "-k", "4"
    )
    rows = [line.split("\t") for line in out.splitlines()]
    probs = [float(p) for _, p in rows]
    assert code == 0 and len(rows) == 4
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1


def test_score_next_and_generate_use_the_tuned_mixture_unless_switched_off(
    tiny_onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model carrying tuned cache settings and an n-gram is scored with them (the summary
    line says so); `--no-cache` and `--no-ngram` leave each out (both: the network alone), for
    `score`, `next` and `generate`."""
    path = tmp_path / "cached.onnx"
    shutil.copyfile(tiny_onnx_model, path)
    tuned = CacheSettings(window=40, theta=0.5, lam=0.3)
    model = LanguageModel(path)
    kn = ngram.fit_kneser_ney(
        model.encode_words(model.prompt_tokens(decode_document(SPEECH)))[0], model.vocab_size
    )
    export.attach_metadata(
        path,
        {
            CACHE_KEY: json.dumps(cache_metadata(tuned)),
            NGRAM_KEY: json.dumps(ngram_metadata(NgramSettings(kn, 0.25))),
        },
    )
    speech = tmp_path / "speech.txt"
    speech.write_bytes(SPEECH)
    text = decode_document(SPEECH)
    on = LanguageModel(path).score(text)
    no_ngram = LanguageModel(path, ngram=False).score(text)
    off = LanguageModel(path, cache=False, ngram=False).score(text)
    assert on.ppl < no_ngram.ppl < off.ppl
    code, out, err = run_cli(capsys, "score", "--model", str(path), str(speech))
    assert code == 0 and err == ""
    assert out == (
        f"perplexity {on.ppl:.2f} over 840 tokens ({on.mean_nll:.4f} nats/token, 90 unknown; "
        "continuous cache: window 40, theta 0.5, lambda 0.3; n-gram: Kneser-Ney order 3, "
        "weight 0.25)\n"
    )
    code, out, err = run_cli(capsys, "score", "--model", str(path), "--no-ngram", str(speech))
    assert code == 0 and err == "" and out.startswith(f"perplexity {no_ngram.ppl:.2f} over")
    code, out, err = run_cli(
        capsys, "score", "--model", str(path), "--no-cache", "--no-ngram", str(speech)
    )
    assert code == 0 and err == ""
    assert out == (
        f"perplexity {off.ppl:.2f} over 840 tokens ({off.mean_nll:.4f} nats/token, 90 unknown)\n"
    )
    for flags, cache, with_ngram in (
        ([], True, True),
        (["--no-cache"], False, True),
        (["--no-cache", "--no-ngram"], False, False),
    ):
        model = LanguageModel(path, cache=cache, ngram=with_ngram)
        prompt = "we will build a strong nation. we will build a strong"
        code, out, _ = run_cli(capsys, "next", "--model", str(path), "--prompt", prompt, *flags)
        rows = [line.split("\t") for line in out.splitlines()]
        expected = model.next_words(prompt, 5)
        assert code == 0 and [w for w, _ in rows] == [w for w, _ in expected]
        assert [float(p) for _, p in rows] == pytest.approx([p for _, p in expected], abs=1e-6)
        sampled = model.generate(prompt, max_tokens=12, seed=3, num_samples=2)
        code, out, _ = run_cli(
            capsys, "generate", "--model", str(path), "--prompt", prompt, "--max-tokens", "12",
            "--seed", "3", "--num-samples", "2", *flags,
        )  # fmt: skip
        assert code == 0 and out.splitlines() == sampled
    for command in ("score", "next", "generate"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and "--no-cache" in out and "continuous cache" in out
        assert "--no-ngram" in out and "Kneser-Ney" in out


def test_empty_prompt(tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_onnx_model), "--seed", "0")
    assert code == 0 and out.strip() and err == ""


def test_only_unknown_words_warn_once(
    tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "generate", "--model", str(tiny_onnx_model), "--prompt", "zork frobozz zork",
        "--max-tokens", "30", "--seed", "0",
    )  # fmt: skip
    assert code == 0 and out.startswith("Zork frobozz zork")
    assert err == (
        "rnnlm: warning: 3 prompt word(s) not in the vocabulary, read as <unk>: 'zork', 'frobozz'\n"
    )


def test_prompt_longer_than_any_window(
    tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = " ".join(["we will build a strong nation ."] * 200)  # 1400 tokens
    code, out, err = run_cli(
        capsys, "next", "--model", str(tiny_onnx_model), "--prompt", prompt, "-k", "2"
    )
    assert code == 0 and len(out.splitlines()) == 2 and err == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "argument --temperature: must be >= 0.0, got -1"),
        (["--temperature", "nan"], "argument --temperature: expected a finite number, got 'nan'"),
        (["--top-k", "-2"], "argument --top-k: must be >= 0, got -2"),
        (["--top-p", "0"], "argument --top-p: must be > 0.0 and <= 1.0, got 0"),
        (["--top-p", "1.5"], "argument --top-p: must be > 0.0 and <= 1.0, got 1.5"),
        (["--num-samples", "0"], "argument --num-samples: must be >= 1 and <= 1000, got 0"),
        (["--max-tokens", "ten"], "argument --max-tokens: expected int, got 'ten'"),
        (["--threads", "0"], "argument --threads: must be >= 1 and <= 1024, got 0"),
    ],
)
def test_bad_arguments_exit_2(
    tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_onnx_model), *args)
    assert code == 2 and out == "" and message in err and "Traceback" not in err


def make_bad_models(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "notes.onnx").write_text("not a model")
    onnx.save(identity_model(), str(tmp_path / "plain.onnx"))
    return {
        "missing": tmp_path / "missing.onnx",
        "text": tmp_path / "notes.onnx",
        "plain": tmp_path / "plain.onnx",
        "folder": tmp_path,
    }


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "missing.onnx: model file not found"),
        ("text", "notes.onnx: not an ONNX model (cannot parse it)"),
        ("plain", "plain.onnx: an ONNX model, but not an rnnlm model (no 'rnnlm.format'"),
        ("folder", ": not a file"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "next", "score"])
def test_bad_model_files_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, message: str, command: str
) -> None:
    model = make_bad_models(tmp_path)[kind]
    extra = ["-"] if command == "score" else []
    code, out, err = run_cli(capsys, command, "--model", str(model), *extra)
    assert code == 1 and out == ""
    assert err.startswith("rnnlm: error: ") and message in err and err.count("\n") == 1


def test_score_bad_inputs(
    tiny_onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys, "score", "--model", str(tiny_onnx_model), str(tmp_path / "no.txt")
    )
    assert code == 1 and err == f"rnnlm: error: {tmp_path / 'no.txt'}: no such file\n"
    (tmp_path / "empty.txt").write_text("\n\n")
    code, _, err = run_cli(
        capsys, "score", "--model", str(tiny_onnx_model), str(tmp_path / "empty.txt")
    )
    assert code == 1 and "nothing to score: the text has no words" in err
    code, _, err = run_cli(capsys, "score", "--model", str(tiny_onnx_model), str(tmp_path))
    assert code == 1 and "is a directory" in err


def test_default_tiny_onnx_model_and_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "next")
    assert code == 1 and "models/model.onnx: model file not found" in err
    code, _, err = run_cli(capsys)
    assert code == 2 and "required: COMMAND" in err
    assert run_cli(capsys, "--help")[0] == 0


def test_subcommands_are_pluggable(capsys: pytest.CaptureFixture[str]) -> None:
    """A later subcommand (e.g. `rnnlm runs`) only appends its `add_` function."""

    def add_hello(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("hello", help="say hi")
        parser.set_defaults(handler=lambda args: print("hi") or 0)

    SUBCOMMANDS.append(add_hello)
    try:
        assert "hello" in build_parser().format_help()
        assert run_cli(capsys, "hello") == (0, "hi\n", "")
    finally:
        SUBCOMMANDS.remove(add_hello)


def test_console_script_has_no_traceback_and_no_torch(
    tiny_onnx_model: Path, tmp_path: Path
) -> None:
    """The inference path (inference + cli) must never import torch or lightning."""
    code = textwrap.dedent(
        """
        import sys
        import rnnlm.inference, rnnlm.cli
        model = rnnlm.inference.LanguageModel(sys.argv[1])
        assert model.generate("the", max_tokens=5, seed=0)[0].startswith("The")
        assert rnnlm.cli.main(["next", "--model", sys.argv[1], "-k", "2"]) == 0
        heavy = {"torch", "pytorch_lightning", "lightning", "mlflow"} & set(sys.modules)
        assert not heavy, heavy
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_onnx_model)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "rnnlm.cli", "score", "--model", str(tmp_path / "x.onnx"), "-"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr == f"rnnlm: error: {tmp_path / 'x.onnx'}: model file not found\n"
