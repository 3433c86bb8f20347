"""export.py: parity per cell and shape, the exporter trap, metadata, int8, the stage end to end.

Tiny networks are built in the tests (8-16 units, a 20-40 word vocabulary); the `run()` tests use
the `processed_tiny` corpus with a checkpoint saved in Lightning's layout and an MLflow run in a
SQLite store under tmp_path. `write_model` is reused by test_inference.py and test_cli.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from nltk.tokenize.punkt import PunktParameters

from rnnlm import export, ngram, tracking
from rnnlm.config import Params, params_digest, training_values
from rnnlm.inference import (
    FORMAT_KEY,
    MODEL_KEY,
    PROVENANCE_KEY,
    VOCAB_KEY,
    LanguageModel,
    ModelLoadError,
)
from rnnlm.model import RNNLM, RNNLMConfig
from rnnlm.streams import EOS, UNK
from rnnlm.text import TextTokenizer
from tests.fixtures import write_full_params

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
WORDS = [
    "the", "president", "said", "that", "we", "will", "build", "a", "strong", "nation", "and",
    "our", "people", "must", "keep", "peace", ".", ",", "?", "today", "congress",
]  # fmt: skip
VOCAB = [UNK, EOS, *dict.fromkeys(WORDS)]
PROVENANCE = {"mlflow_run_id": "run123", "git_commit": "abc", "params_digest": "d" * 64}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for tiny networks: faster, and no OpenMP stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_tokenizer() -> TextTokenizer:
    return TextTokenizer(punkt=PunktParameters(), lowercase=True, paragraphs="line")


def build_net(
    cell: str = "lstm",
    vocab_size: int = len(VOCAB),
    hidden: int = 8,
    layers: int = 2,
    seed: int = 0,
    bias: dict[int, float] | None = None,
    cutoffs: tuple[int, ...] = (),
) -> RNNLM:
    """A random network in eval mode; non-zero recurrent biases (GRU's b_hn matters)."""
    torch.manual_seed(seed)
    config = RNNLMConfig(
        vocab_size=vocab_size, cell=cell, embedding_dim=hidden, hidden_dim=hidden,
        num_layers=layers, dropout=0.3, embedding_dropout=0.1, tie_weights=False,
        weight_drop=0.0, softmax_cutoffs=cutoffs,
    )  # fmt: skip
    net = RNNLM(config)
    with torch.no_grad():
        for name, param in net.rnn.named_parameters():
            if "bias" in name:
                param.uniform_(-0.5, 0.5)
        net.decoder.weight.uniform_(-1.0, 1.0)  # logits of a few units: sampling is not flat
        for token, value in (bias or {}).items():
            net.decoder.bias[token] = value
    return net.eval()


def write_model(
    path: Path, net: RNNLM, vocab: list[str] | None = None, quantize: bool = False
) -> Path:
    """`net` with full rnnlm metadata at `path` (the export stage's sequence; the int8 copy
    beside it as `<stem>.int8.onnx`, kept only when `quantize`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    int8_name = path.with_suffix(".int8.onnx").name
    _, int8 = export.write_onnx_models(
        net, path.parent, vocab or VOCAB, tiny_tokenizer().to_dict(), PROVENANCE,
        names=(path.name, int8_name),
    )  # fmt: skip
    if not quantize:
        int8.unlink()
    return path


@pytest.mark.parametrize("cell", CELLS)
def test_parity_for_each_cell_at_several_shapes(tmp_path: Path, cell: str) -> None:
    net = build_net(cell)
    path = tmp_path / "m.onnx"
    export.export_onnx(net, path, "torchscript", 17)
    shapes = ((1, 1), (3, 11), (5, 2), (2, 40))
    errors = export.verify_parity(net, path, atol=1e-4, shapes=shapes, step_shape=(4, 7))
    checked = ["logits", "hidden", *(["h", "c"] if cell == "lstm" else ["h"])]
    expected = {f"b{b}_t{t}/{n}" for b, t in shapes for n in checked}
    expected |= {f"step/{n}" for n in checked} | {"max"}
    assert set(errors) == expected
    assert 0 <= errors["max"] < 1e-5
    assert errors["max"] == max(v for k, v in errors.items() if k != "max")


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_adaptive_softmax_exports_scores_and_quantizes(tmp_path: Path, cell: str) -> None:
    """The adaptive decoder's graph returns log-probabilities that match PyTorch at several
    shapes; the torch-free scorer and the int8 copy give PyTorch's perplexity."""
    net = build_net(cell, cutoffs=(3, 6))
    path = write_model(tmp_path / "m.onnx", net, quantize=True)
    errors = export.verify_parity(net, path, atol=1e-4, shapes=((1, 1), (3, 11), (2, 40)))
    assert errors["max"] < 1e-5
    stream = np.random.default_rng(0).integers(0, len(VOCAB), 300)
    expected = torch_stream_ppl(net, stream)
    assert LanguageModel(path, cache=False).score_ids(stream).ppl == pytest.approx(
        expected, rel=1e-5
    )
    int8 = LanguageModel(tmp_path / "m.int8.onnx", cache=False).score_ids(stream).ppl
    assert int8 == pytest.approx(expected, rel=0.02)
    meta = onnx.load(str(path)).metadata_props
    assert json.loads(next(p.value for p in meta if p.key == MODEL_KEY))["softmax_cutoffs"] == [
        3,
        6,
    ]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_hidden_output_is_the_top_layer_and_the_parity_check_covers_it(
    tmp_path: Path, cell: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hidden` is the top layer's h at every step (batch, time, hidden_dim), for LSTM too;
    a graph whose `hidden` alone is wrong fails the parity check."""
    net = build_net(cell, layers=2)
    path = write_model(tmp_path / "m.onnx", net)
    ids = torch.randint(0, len(VOCAB), (3, 6), generator=torch.Generator().manual_seed(0))
    model = LanguageModel(path)
    _, hidden, state = model._run_hidden(ids.numpy(), model.initial_state(3))
    assert hidden.shape == (3, 6, 8) and hidden.dtype == np.float32
    np.testing.assert_allclose(hidden[:, -1], state[0][-1], atol=1e-6)  # h1 of the top layer
    zero = net.init_state(3)
    with torch.no_grad():
        out, _ = net.rnn(net.embedding(ids), zero if cell == "lstm" else zero[0])
    np.testing.assert_allclose(hidden, out.numpy(), atol=1e-5)

    real = net.forward_with_hidden

    def shifted(ids: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple:
        logits, next_state, hidden = real(ids, state)
        return logits, next_state, hidden + 1e-3

    monkeypatch.setattr(net, "forward_with_hidden", shifted)
    with pytest.raises(export.ParityError, match=r"0\.001 > export\.atol = 0\.0001 at \w+/hidden"):
        export.verify_parity(net, path, atol=1e-4)


def test_parity_shapes_differ_from_the_export_example() -> None:
    batch, length = export.EXPORT_SHAPE
    assert any(b != batch and t != length for b, t in export.PARITY_SHAPES)
    assert export.STEP_SHAPE[0] != batch and export.STEP_SHAPE[1] != length


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("rnn_tanh", "onnxruntime cannot run the exported model on tokens of shape (3, 11)"),
        ("gru", "declares fixed sizes for dimensions that must stay dynamic (logits[1] = 5"),
    ],
)
def test_dynamo_exporter_is_refused_by_the_parity_check(
    tmp_path: Path, cell: str, message: str
) -> None:
    """The trap of torch 2.13's dynamo exporter: nn.RNN gets a fixed time axis, GRU a fixed
    time size in its output shape. The parity check is what catches both."""
    net = build_net(cell, layers=1)
    path = tmp_path / "m.onnx"
    export.export_onnx(net, path, "dynamo", 18)
    with pytest.raises(export.ParityError, match=re.escape(message)):
        export.verify_parity(net, path, atol=1e-4)


def test_parity_check_catches_a_wrong_graph(tmp_path: Path) -> None:
    net = build_net("gru")
    path = tmp_path / "m.onnx"
    export.export_onnx(net, path, "torchscript", 17)
    with torch.no_grad():
        net.rnn.bias_hh_l0[2 * net.config.hidden_dim :] += 0.1  # b_hn: linear_before_reset's
    with pytest.raises(export.ParityError, match=r"does not match PyTorch: max \|difference\|"):
        export.verify_parity(net, path, atol=1e-4)


def test_unknown_exporter(tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="unknown exporter 'jit'"):
        export.export_onnx(build_net(), tmp_path / "m.onnx", "jit", 17)


def test_metadata_round_trip(tmp_path: Path) -> None:
    net = build_net("lstm")
    path = write_model(tmp_path / "m.onnx", net)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props[FORMAT_KEY]) == 1
    assert json.loads(props[VOCAB_KEY]) == VOCAB
    model = LanguageModel(path)
    assert model.vocab == VOCAB
    assert model.tokenizer.to_dict() == tiny_tokenizer().to_dict()
    assert model.provenance == PROVENANCE
    assert model.config == {
        "vocab_size": len(VOCAB), "cell": "lstm", "embedding_dim": 8, "hidden_dim": 8,
        "num_layers": 2, "dropout": 0.3, "embedding_dropout": 0.1, "tie_weights": False,
        "weight_drop": 0.0, "softmax_cutoffs": [],
    }  # fmt: skip
    assert model.state_names == ["h", "c"]
    assert model.precision == "fp32"
    assert [i.name for i in model._session.get_inputs()] == ["tokens", "h0", "c0"]
    outputs = {o.name: o.shape for o in model._session.get_outputs()}
    assert outputs == {
        "logits": ["batch", "time", len(VOCAB)], "hidden": ["batch", "time", 8],
        "h1": [2, "batch", 8], "c1": [2, "batch", 8],
    }  # fmt: skip
    assert model.tuned_cache is None and model.cache is None  # until the export stage tunes it


def test_metadata_refuses_a_vocabulary_of_another_model() -> None:
    with pytest.raises(
        export.ExportError, match=f"vocabulary has 3 tokens but the model {len(VOCAB)}"
    ):
        export.build_metadata(build_net().config, VOCAB[:3], tiny_tokenizer().to_dict(), {})


def test_load_checkpoint_in_lightning_layout(tmp_path: Path) -> None:
    net = build_net("gru")
    path = tmp_path / "model.ckpt"
    save_lightning_checkpoint(net, path)
    loaded = export.load_checkpoint(path)
    assert not loaded.training
    ids = torch.randint(0, len(VOCAB), (2, 6))
    with torch.no_grad():
        expected, _ = net(ids, net.init_state(2))
        got, _ = loaded(ids, loaded.init_state(2))
    torch.testing.assert_close(got, expected)


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="checkpoint not found"):
        export.load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(export.ExportError, match="not a loadable checkpoint"):
        export.load_checkpoint(tmp_path / "bad.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(export.ExportError, match="not an rnnlm checkpoint"):
        export.load_checkpoint(tmp_path / "other.ckpt")


def test_int8_model_keeps_metadata_and_quantizes_the_heavy_ops(tmp_path: Path) -> None:
    net = build_net("lstm", hidden=16)
    path = write_model(tmp_path / "m.onnx", net, quantize=True)
    int8 = tmp_path / "m.int8.onnx"
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= ops and "LSTM" not in ops
    fp32_model, int8_model = LanguageModel(path), LanguageModel(int8)
    assert int8_model.precision == "int8" and int8_model.vocab == VOCAB
    ids = np.array([[1, 2, 3, 4, 5]], dtype=np.int64)
    fp32_logits, _ = fp32_model.step(ids)
    int8_logits, _ = int8_model.step(ids)
    assert np.abs(fp32_logits - int8_logits).max() < 0.1


def save_lightning_checkpoint(net: RNNLM, path: Path) -> None:
    """What train.py writes, reduced to what export reads: prefixed weights, model kwargs."""
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {"model": dataclasses.asdict(net.config), "lr": 0.01},
        },
        path,
    )


@pytest.fixture
def trained_layout(processed_tiny: Params) -> Params:
    """`processed_tiny` plus a checkpoint for its vocabulary and an MLflow training run."""
    paths = processed_tiny.paths
    vocab = json.loads((paths.processed_dir / "vocab.json").read_text())["tokens"]
    paths.models_dir.mkdir(parents=True, exist_ok=True)
    save_lightning_checkpoint(build_net("lstm", len(vocab), 16, 1), paths.models_dir / "model.ckpt")
    tracked = tracking.start_run(processed_tiny.mlflow, "train-run", {"stage": "train"})
    paths.metrics_dir.mkdir(parents=True, exist_ok=True)
    paths.train_run.write_text(json.dumps({"run_id": tracked.run_id}))
    return processed_tiny


def torch_stream_ppl(net: RNNLM, stream: np.ndarray) -> float:
    """PyTorch's perplexity of a stream, `<eos>`-start convention, one pass."""
    inputs = torch.from_numpy(np.concatenate([[1], stream[:-1]]).astype(np.int64))[None]
    with torch.no_grad():
        logits, _ = net(inputs, net.init_state(1))
        nll = torch.nn.functional.cross_entropy(
            logits[0].double(), torch.from_numpy(stream.astype(np.int64))
        )
    return float(torch.exp(nll))


def test_run_end_to_end_logs_and_registers(
    trained_layout: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    params = trained_layout
    paths = params.paths
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    run_id = json.loads(paths.train_run.read_text())["run_id"]
    # What an export killed while uploading (Ctrl-C, SIGKILL) leaves: a model still PENDING.
    experiment_id = client.get_run(run_id).info.experiment_id
    killed = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    p = dataclasses.replace(params.export, latency_tokens=20, registered_model_name="tiny-lm")
    metrics = export.run_from_params(dataclasses.replace(params, export=p))
    assert client.get_logged_model(killed.model_id).status == "FAILED"
    # mlflow.set_tracking_uri exports the variable; later stages and subprocesses would
    # inherit it and log to this store whatever their params say.
    assert "MLFLOW_TRACKING_URI" not in os.environ

    onnx_path, int8_path = paths.models_dir / "model.onnx", paths.models_dir / "model.int8.onnx"
    assert onnx_path.is_file() and int8_path.is_file()
    assert sorted(f.name for f in paths.models_dir.iterdir()) == [
        "model.ckpt", "model.int8.onnx", "model.onnx",
    ]  # fmt: skip
    written = json.loads(paths.export_metrics.read_text())
    record = json.loads(paths.export_model.read_text())
    assert {**written, **record} == json.loads(json.dumps(metrics))
    # A DVC metrics file holds numbers only: ids and URIs are in the model record.
    assert all(isinstance(v, int | float) for v in written.values()), written
    assert set(record) == {"model_uri", "model_id", "registered_model", "registered_version"}
    assert written["parity/max_abs_err"] < 1e-4
    assert written["onnx/size_mb"] > written["int8/size_mb"] > 0
    assert written["onnx/ms_per_token"] > 0 and written["int8/speedup"] > 0
    assert abs(written["int8/val_ppl_change_pct"]) <= p.int8_max_ppl_change_pct  # the gate

    net = export.load_checkpoint(paths.models_dir / "model.ckpt")
    validation = np.load(paths.processed_dir / "validation.npy")
    assert written["onnx/val_ppl"] == pytest.approx(torch_stream_ppl(net, validation), rel=1e-4)

    # The continuous cache tuned on validation: the best grid point, in both models' metadata.
    model = LanguageModel(onnx_path)
    tuned = model.tuned_cache
    assert tuned is not None and model.cache == tuned
    assert LanguageModel(int8_path).tuned_cache == tuned
    grid = (p.cache_thetas, p.cache_lambdas, p.cache_windows)
    assert (tuned.theta, tuned.lam, tuned.window) in itertools.product(*grid)
    assert (written["cache/theta"], written["cache/lambda"], written["cache/window"]) == (
        tuned.theta, tuned.lam, tuned.window,
    )  # fmt: skip
    assert written["cache/val_ppl"] == pytest.approx(
        model.score_ids(validation, ngram=False).ppl, rel=1e-5
    )
    assert written["cache/val_ppl"] < written["onnx/val_ppl"]
    assert written["cache/val_gain_pct"] == pytest.approx(
        100 * (1 - written["cache/val_ppl"] / written["onnx/val_ppl"]), abs=1e-3
    )
    assert 0 < written["cache/tune_s"] < 60
    # Then the Kneser-Ney n-gram counted on train, its weight fitted on validation by EM over
    # the cached log-probs: in both models, and what the model now scores validation with.
    train_ids = np.load(paths.processed_dir / "train.npy")
    kn = ngram.fit_kneser_ney(train_ids, model.vocab_size, p.ngram_order, p.ngram_discount)
    shipped = model.tuned_ngram
    assert shipped is not None and model.ngram == shipped
    assert all(np.array_equal(shipped.model.keys[k], kn.keys[k]) for k in kn.keys)
    assert all(np.array_equal(shipped.model.counts[n], kn.counts[n]) for n in kn.counts)
    cached = -model.token_nlls(validation, ngram=False)
    weight = ngram.interpolation_weight(cached, kn.logprobs(validation))
    assert shipped.weight == pytest.approx(weight, abs=1e-9) and 0 < weight < 1
    assert written["ngram/weight"] == written["ngram/em_weight"] == round(weight, 4)
    int8_ngram = LanguageModel(int8_path).tuned_ngram
    assert int8_ngram is not None and int8_ngram.weight == shipped.weight
    assert written["ngram/val_ppl"] == pytest.approx(model.score_ids(validation).ppl, rel=1e-5)
    assert written["ngram/val_ppl"] < written["cache/val_ppl"]
    assert written["ngram/val_gain_pct"] == pytest.approx(
        100 * (1 - written["ngram/val_ppl"] / written["cache/val_ppl"]), abs=1e-3
    )
    assert written["ngram/entry_mb"] > 0
    assert model.provenance["mlflow_run_id"] == run_id
    assert model.conventions["stream_start"].startswith("a stream starts at a sentence boundary")
    assert model.provenance["params_digest"] == params_digest(
        training_values(params.model, params.train)
    )
    assert model.generate("the nation", max_tokens=5, seed=1)[0].startswith("The nation")

    versions = client.search_model_versions("name = 'tiny-lm'")
    assert [str(v.version) for v in versions] == ["1"] and record["registered_version"] == "1"
    assert "champion" in client.get_registered_model("tiny-lm").description
    logged = client.get_logged_model(record["model_id"])
    assert logged.source_run_id == run_id
    assert versions[0].run_id == run_id
    run = client.get_run(run_id)
    assert run.data.metrics["parity/max_abs_err"] == pytest.approx(written["parity/max_abs_err"])
    for key in ("cache/val_ppl", "cache/theta", "cache/lambda", "cache/window"):
        assert run.data.metrics[key] == pytest.approx(written[key]), key
    artifacts = {a.path for a in client.list_artifacts(run_id, "onnx_int8")}
    assert artifacts == {"onnx_int8/model.int8.onnx"}
    # The registered version is the pyfunc model, the exported file inside it byte for byte.
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{logged.artifact_location}/artifacts/model.onnx",
        dst_path=str(paths.metrics_dir),
    )
    assert Path(local).read_bytes() == onnx_path.read_bytes()
    assert logged.metrics and {m.key for m in logged.metrics} >= {"onnx/val_ppl", "cache/val_ppl"}
    assert logged.params["export.cache_windows"] == str(p.cache_windows)  # the grid searched
    monkeypatch.setenv("MLFLOW_TRACKING_URI", params.mlflow.tracking_uri)  # for models:/ URIs
    info = mlflow.models.get_model_info("models:/tiny-lm/1")
    assert info.signature.inputs.input_names() == ["text"]
    assert {spec.name for spec in info.signature.params.params} >= {"task", "k", "max_tokens"}
    assert info.saved_input_example_info is not None
    assert info.flavors["python_function"]["config"] == {
        "threads": p.serving_threads,
        "max_documents": p.serving_max_documents,
        "max_chars": p.serving_max_chars,
        "max_tokens": p.serving_max_tokens,
    }
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/tiny-lm/1")).read_text()
    assert "onnxruntime==" in requirements and "torch" not in requirements
    served = mlflow.pyfunc.load_model("models:/tiny-lm/1")
    texts = ["The nation will build a strong economy.", ""]
    scored = served.predict(pd.DataFrame({"text": texts}))
    assert scored["ppl"][0] == model.score(texts[0]).ppl
    assert scored["error"].tolist() == [None, "nothing to score: the text has no words"]


def test_failed_parity_leaves_models_untouched(trained_layout: Params) -> None:
    paths = trained_layout.paths
    (paths.models_dir / "model.onnx").write_bytes(b"previous model")
    before = sorted(p.name for p in paths.models_dir.parent.rglob("*"))
    with pytest.raises(export.ParityError, match=r"export\.atol = 1e-12"):
        export.run(
            dataclasses.replace(trained_layout.export, atol=1e-12),
            paths,
            trained_layout.mlflow,
            digest="d" * 64,
        )
    assert (paths.models_dir / "model.onnx").read_bytes() == b"previous model"
    assert not (paths.models_dir / "model.int8.onnx").exists()
    assert not (paths.metrics_dir / "export.json").exists()
    assert sorted(p.name for p in paths.models_dir.parent.rglob("*")) == before


def test_int8_perplexity_gate() -> None:
    for int8, fails in ((100.49, False), (99.51, False), (100.51, True), (99.4, True)):
        metrics = {"onnx/val_ppl": 100.0, "int8/val_ppl": int8}
        if fails:
            with pytest.raises(export.ExportError, match=r"more than export\.int8_max_ppl"):
                export.check_int8_perplexity(metrics, 0.5)
        else:
            export.check_int8_perplexity(metrics, 0.5)


def test_an_int8_model_off_the_gate_fails_the_stage_and_leaves_models_untouched(
    trained_layout: Params,
) -> None:
    paths = trained_layout.paths
    p = dataclasses.replace(trained_layout.export, int8_max_ppl_change_pct=1e-9)
    with pytest.raises(export.ExportError, match=r"int8_max_ppl_change_pct = 1e-09%: quantize"):
        export.run(p, paths, trained_layout.mlflow, digest="d" * 64)
    assert sorted(f.name for f in paths.models_dir.iterdir()) == ["model.ckpt"]
    assert not paths.export_metrics.exists()


def test_int8_model_is_replaced_with_the_model_and_nothing_is_registered_without_a_name(
    trained_layout: Params,
) -> None:
    import mlflow

    paths = trained_layout.paths
    paths.int8_model.write_bytes(b"int8 model of another experiment")
    p = dataclasses.replace(trained_layout.export, registered_model_name=None, ngram_mix=False)
    metrics = export.run(p, paths, trained_layout.mlflow, digest="d" * 64)
    fp32, int8 = LanguageModel(paths.onnx_model), LanguageModel(paths.int8_model)
    # export.ngram_mix off: no n-gram in either model, though EM found a weight that pays.
    assert fp32.tuned_ngram is None and int8.tuned_ngram is None
    assert metrics["ngram/weight"] == 0 and metrics["ngram/em_weight"] > 0
    assert metrics["ngram/val_ppl"] == metrics["cache/val_ppl"]
    assert int8.precision == "int8" and fp32.precision == "fp32"
    assert int8.provenance == fp32.provenance  # the same checkpoint, the same run
    assert metrics["int8/val_ppl"] > 1
    assert metrics["registered_version"] is None
    assert json.loads(paths.export_model.read_text())["registered_model"] is None
    client = mlflow.MlflowClient(tracking_uri=trained_layout.mlflow.tracking_uri)
    assert client.search_registered_models() == []


def test_main_reports_a_missing_checkpoint(
    processed_tiny: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params_file = write_full_params(processed_tiny, tmp_path / "params.yaml")
    with pytest.raises(SystemExit) as exit_:
        export.main(["--params", str(params_file)])
    assert exit_.value.code == 1
    assert "checkpoint not found (run the train stage first)" in caplog.text


def test_inference_refuses_a_model_without_rnnlm_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    export.export_onnx(build_net(), path, "torchscript", 17)
    with pytest.raises(ModelLoadError, match="not an rnnlm model"):
        LanguageModel(path)
    props = onnx.load(str(path))
    onnx.helper.set_model_props(props, {FORMAT_KEY: "1", PROVENANCE_KEY: "{}"})
    onnx.save(props, str(path))
    with pytest.raises(ModelLoadError, match=r"metadata incomplete, missing rnnlm\.model"):
        LanguageModel(path)
