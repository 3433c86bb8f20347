"""The plain network, the Lightning module's truncated BPTT and the data windows."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rnnlm.config import ConfigError, Params
from rnnlm.datamodule import CorpusDataModule, StreamWindows
from rnnlm.export import load_checkpoint
from rnnlm.lit_module import LitRNNLM, temporal_activation_penalty
from rnnlm.model import RNNLM, Decoder, RNNLMConfig, detach_state, state_names
from rnnlm.streams import batchify, shard_rows
from tests.fixtures import shipped_params

CELLS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]


def tiny_config(cell: str, **overrides: object) -> dict:
    config = {
        "vocab_size": 23,
        "cell": cell,
        "embedding_dim": 8,
        "hidden_dim": 8,
        "num_layers": 2,
        "dropout": 0.0,
        "embedding_dropout": 0.0,
        "tie_weights": True,
        "weight_drop": 0.0,
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize("cell", CELLS)
def test_forward_shapes_and_state_threading(cell: str) -> None:
    torch.manual_seed(0)
    net = RNNLM(RNNLMConfig(**tiny_config(cell))).eval()
    ids = torch.randint(0, 23, (3, 5))
    state = net.init_state(3)
    assert len(state) == len(state_names(cell)) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (2, 3, 8) and not s.any() for s in state)

    logits, next_state = net(ids, state)
    assert logits.shape == (3, 5, 23)
    assert [s.shape for s in next_state] == [s.shape for s in state]
    assert all(s.abs().sum() > 0 for s in next_state)

    # Feeding the sequence in two parts with the state carried equals one full pass...
    first, mid_state = net(ids[:, :2], state)
    second, _ = net(ids[:, 2:], mid_state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), logits)
    # ...and a different incoming state changes the output.
    other, _ = net(ids[:, 2:], state)
    assert not torch.allclose(other, second)


def test_vanilla_rnn_is_the_tanh_recurrence() -> None:
    """rnn_tanh computes h_t = tanh(W h_{t-1} + U x_t + b), o_t = V h_t + c."""
    torch.manual_seed(0)
    net = RNNLM(RNNLMConfig(**tiny_config("rnn_tanh", num_layers=1))).eval()
    ids = torch.tensor([[3, 7, 1]])
    logits, (h_last,) = net(ids, net.init_state(1))
    rnn = net.rnn
    h = torch.zeros(8)
    for t, token in enumerate(ids[0]):
        x = net.embedding.weight[token]
        h = torch.tanh(
            rnn.weight_hh_l0 @ h + rnn.bias_hh_l0 + rnn.weight_ih_l0 @ x + rnn.bias_ih_l0
        )
        expected = net.decoder.weight @ h + net.decoder.bias
        torch.testing.assert_close(logits[0, t], expected)
    torch.testing.assert_close(h_last[0, 0], h)


def test_tie_weights_shares_the_embedding_and_needs_equal_dims() -> None:
    net = RNNLM(RNNLMConfig(**tiny_config("gru")))
    assert net.decoder.weight is net.embedding.weight
    untied = RNNLM(RNNLMConfig(**tiny_config("gru", tie_weights=False, hidden_dim=6)))
    assert untied.decoder.weight is not untied.embedding.weight
    with pytest.raises(ValueError, match="embedding_dim == hidden_dim"):
        RNNLM(RNNLMConfig(**tiny_config("gru", hidden_dim=6)))


@pytest.mark.parametrize(
    ("cell", "cutoffs"), [*((cell, ()) for cell in CELLS), ("gru", (4, 8)), ("lstm", (6,))]
)
def test_tiny_model_overfits_a_repeating_sequence(cell: str, cutoffs: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    config = tiny_config(
        cell, embedding_dim=16, hidden_dim=16, num_layers=1, softmax_cutoffs=cutoffs
    )
    net = RNNLM(RNNLMConfig(**config))
    pattern = torch.tensor([2, 5, 9, 4, 11, 7, 3, 8])  # head and both tail clusters
    stream = pattern.repeat(12)
    inputs, targets = stream[:-1].unsqueeze(0), stream[1:].unsqueeze(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    initial = None
    for _ in range(150):
        window = net.window(inputs, net.init_state(1))
        loss = net.decoder.nll(window.dropped, targets) / targets.numel()
        initial = initial if initial is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert initial > 2.5  # about log(23) at the start
    assert loss.item() < 0.1


@pytest.mark.parametrize("cutoffs", [(), (5,), (4, 11), (1, 2, 22)])
def test_decoder_nll_is_the_distribution_it_returns(cutoffs: tuple[int, ...]) -> None:
    """`nll` (head plus only the targets' clusters) equals -log softmax(forward) at the
    targets, gradients included; the adaptive forward returns normalised log-probs."""
    torch.manual_seed(0)
    decoder = Decoder(6, 23, cutoffs)
    decoder.reset_parameters(output_vectors=True)
    with torch.no_grad():
        decoder.bias.normal_()
    x = torch.randn(3, 7, 6)
    targets = torch.randint(0, 23, (3, 7))
    targets[0, : len(cutoffs) + 2] = torch.tensor([0, *cutoffs, 22])  # every part's edges
    logits = decoder(x)
    log_probs = logits.log_softmax(-1)
    if cutoffs:
        torch.testing.assert_close(logits, log_probs)
    expected = -log_probs.gather(-1, targets[..., None]).sum()
    nll = decoder.nll(x, targets)
    torch.testing.assert_close(nll, expected)
    weights = list(decoder.parameters())
    for got, want in zip(
        torch.autograd.grad(nll, weights), torch.autograd.grad(expected, weights), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_adaptive_softmax_is_head_times_cluster() -> None:
    """p(w) = p_head(w) for a head word, p_head(cluster) * softmax over the cluster for a
    tail word, computed here from the weights directly."""
    torch.manual_seed(1)
    decoder = Decoder(4, 10, (3, 6))
    decoder.reset_parameters(output_vectors=True)
    h = torch.randn(4, dtype=torch.float64)
    w, b = decoder.weight.double().detach(), decoder.bias.double().detach()
    cw, cb = decoder.cluster_weight.double().detach(), decoder.cluster_bias.double().detach()
    head = torch.cat([w[:3] @ h + b[:3], cw @ h + cb]).softmax(0)  # 3 words, 2 clusters
    expected = torch.cat(
        [
            head[:3],
            head[3] * (w[3:6] @ h + b[3:6]).softmax(0),
            head[4] * (w[6:] @ h + b[6:]).softmax(0),
        ]
    )
    with torch.no_grad():
        probs = decoder.double()(h).exp()
    torch.testing.assert_close(probs, expected)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)


def test_adaptive_softmax_ties_every_word_to_its_embedding() -> None:
    net = RNNLM(RNNLMConfig(**tiny_config("gru", softmax_cutoffs=(5, 12))))
    assert net.decoder.weight is net.embedding.weight
    assert net.decoder.cluster_weight.shape == (2, 8)
    plain = RNNLM(RNNLMConfig(**tiny_config("gru")))
    assert sorted(plain.state_dict()) == sorted(
        k for k in net.state_dict() if not k.startswith("decoder.cluster_")
    )  # the one-softmax model keeps its checkpoint keys
    with pytest.raises(ValueError, match=r"cutoffs \[5, 23\] must increase strictly"):
        Decoder(8, 23, (5, 23))


def test_batchify_and_windows_keep_each_row_contiguous() -> None:
    stream = np.arange(2, 25, dtype=np.int32)  # 23 tokens
    assert batchify(stream, 4).tolist() == np.arange(2, 22).reshape(4, 5).tolist()
    windows = StreamWindows(stream, n_rows=2, bptt=4)
    assert windows.n_tokens == 22 and len(windows) == 3
    rows = [torch.cat([windows[i][1][r] for i in range(len(windows))]) for r in range(2)]
    assert rows[0].tolist() == list(range(2, 13))
    assert rows[1].tolist() == list(range(13, 24))
    x, _ = windows[1]
    assert x[:, 0].tolist() == windows[0][1][:, -1].tolist()  # inputs are targets shifted
    with pytest.raises(IndexError):
        windows[3]
    with pytest.raises(ValueError, match="cannot feed"):
        batchify(stream, 30)


def test_ddp_shards_cover_every_row_once() -> None:
    for n_rows, world in [(10, 3), (4, 4), (7, 2)]:
        covered = [
            r for rank in range(world) for r in range(n_rows)[shard_rows(n_rows, rank, world)]
        ]
        assert covered == list(range(n_rows))
    stream = np.arange(2, 102, dtype=np.int32)
    full = StreamWindows(stream, n_rows=4, bptt=5)
    parts = [StreamWindows(stream, 4, 5, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([p.targets for p in parts]), full.targets)


def test_fewer_rows_than_processes_leave_the_last_ones_empty_windows_in_step() -> None:
    stream = np.arange(2, 102, dtype=np.int32)
    whole = StreamWindows(stream, n_rows=1, bptt=8)
    first, second = (StreamWindows(stream, 1, 8, rank=r, world_size=2) for r in range(2))
    assert torch.equal(first.targets, whole.targets)  # rank 0 reads the whole stream
    assert len(second) == len(whole) and second.n_tokens == 0
    assert [tuple(second[i][1].shape) for i in range(len(second))] == [
        (0, whole[i][1].shape[1]) for i in range(len(whole))
    ]


def test_fewer_training_rows_than_processes_is_a_config_error(processed_tiny: Params) -> None:
    datamodule = CorpusDataModule(processed_tiny.paths, batch_size=3, bptt=8)
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=4)  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"train.batch_size = 3 .* 4 training processes"):
        datamodule.setup("fit")
    datamodule.trainer = SimpleNamespace(global_rank=1, world_size=3)  # type: ignore[assignment]
    datamodule.setup("fit")
    assert datamodule.datasets["train"].inputs.shape[0] == 1
    assert datamodule.datasets["validation"].n_tokens == 0  # eval_batch_size 1: rank 0's row


def _eval_nll(module: LitRNNLM, stream: np.ndarray, bptt: int) -> float:
    """Total NLL of the stream through the module's validation path with windows of `bptt`."""
    module._state["val"] = None
    total = 0.0
    with torch.no_grad():
        for i in range(len(windows := StreamWindows(stream, 1, bptt))):
            nll = module._step("val", windows[i])[0]
            total += nll.item()
    return total


@pytest.mark.parametrize("cell", CELLS)
def test_evaluation_carries_state_across_windows(cell: str) -> None:
    """With the state carried, window size cannot change the NLL; resetting it would."""
    torch.manual_seed(0)
    module = LitRNNLM.of(RNNLMConfig(**tiny_config(cell)), shipped_params().train).eval()
    stream = np.random.default_rng(0).integers(2, 23, size=120).astype(np.int32)
    whole = _eval_nll(module, stream, bptt=120)
    assert _eval_nll(module, stream, bptt=7) == pytest.approx(whole, rel=1e-5)

    # The same windows with the state reset each time give a different answer.
    reset = 0.0
    windows = StreamWindows(stream, 1, 7)
    with torch.no_grad():
        for i in range(len(windows)):
            module._state["val"] = None
            reset += module._step("val", windows[i])[0].item()
    assert abs(reset - whole) > 1e-3


def test_training_state_is_carried_but_detached() -> None:
    torch.manual_seed(0)
    module = LitRNNLM.of(RNNLMConfig(**tiny_config("lstm")), shipped_params().train)
    windows = StreamWindows(np.arange(2, 60, dtype=np.int32) % 21 + 2, n_rows=2, bptt=5)
    module.on_train_epoch_start()
    assert module._state["train"] is None
    module._step("train", windows[0])
    carried = module._state["train"]
    assert carried is not None and all(not s.requires_grad for s in carried)
    assert all(s.abs().sum() > 0 for s in carried)
    # The next window starts from exactly that state.
    expected, _ = module.net(windows[1][0], carried)
    logits, _ = module.net(windows[1][0], module._state["train"])
    torch.testing.assert_close(logits, expected)
    module.on_train_epoch_start()
    assert module._state["train"] is None


def test_detach_state_cuts_the_graph() -> None:
    h = torch.ones(1, 1, 2, requires_grad=True) * 2
    (detached,) = detach_state((h,))
    assert h.requires_grad and not detached.requires_grad
    assert torch.equal(detached, h)


def _regularised(cell: str = "gru", **train: object) -> LitRNNLM:
    """A tiny module with the shipped train params, `train` values replaced."""
    config = RNNLMConfig(**tiny_config(cell, weight_drop=float(train.pop("weight_drop", 0.0))))
    t = dataclasses.replace(shipped_params().train, **train)  # type: ignore[arg-type]
    return LitRNNLM.of(config, t)


def _windows(rows: int = 2, bptt: int = 6) -> StreamWindows:
    stream = np.random.default_rng(1).integers(2, 23, size=200).astype(np.int32)
    return StreamWindows(stream, n_rows=rows, bptt=bptt)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_tanh"])
def test_weight_drop_changes_training_but_not_evaluation(cell: str) -> None:
    torch.manual_seed(0)
    dropped = RNNLM(RNNLMConfig(**tiny_config(cell, weight_drop=0.5)))
    plain = RNNLM(RNNLMConfig(**tiny_config(cell)))
    plain.load_state_dict(dropped.state_dict())
    ids, _ = _windows()[0]
    state = plain.init_state(ids.shape[0])
    # Training: a fresh DropConnect mask per call, and gradients reach the plain weights.
    first, _ = dropped.train()(ids, state)
    second, _ = dropped(ids, state)
    assert not torch.allclose(first, second)
    first.sum().backward()
    grad = dropped.rnn.weight_hh_l0.grad
    assert grad is not None and 0.2 < (grad == 0).float().mean().item() < 0.8  # the mask's zeros
    # Evaluation: exactly the network without weight drop.
    torch.testing.assert_close(dropped.eval()(ids, state), plain.eval()(ids, state))


def test_ar_and_tar_change_the_training_objective_only() -> None:
    torch.manual_seed(0)
    plain = _regularised(ar_alpha=0.0, tar_beta=0.0)  # whatever params.yaml ships
    regularised = _regularised(ar_alpha=2.0, tar_beta=1.0)
    regularised.load_state_dict(plain.state_dict())
    batch = _windows()[0]
    for module in (plain, regularised):
        module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer
        module.on_train_epoch_start()
    loss = plain.training_step(batch, 0)
    objective = regularised.training_step(batch, 0)
    hidden, _ = plain.net.recurrent(batch[0], plain.net.init_state(batch[0].shape[0]))
    dropped = plain.net.output_dropout(hidden)  # dropout 0 in tiny_config: equal to hidden
    penalty = 2.0 * dropped.pow(2).mean() + 1.0 * (hidden[:, 1:] - hidden[:, :-1]).pow(2).mean()
    assert penalty.item() > 1e-4
    torch.testing.assert_close(objective, loss + penalty)
    # Evaluation NLL is the cross-entropy alone, whatever the training penalties.
    stream = np.random.default_rng(2).integers(2, 23, size=60).astype(np.int32)
    assert _eval_nll(regularised.eval(), stream, 16) == pytest.approx(
        _eval_nll(plain.eval(), stream, 16), rel=1e-6
    )


def test_tar_of_a_one_step_window_is_zero() -> None:
    assert temporal_activation_penalty(torch.ones(3, 1, 4)).item() == 0.0


def _train_steps(module: LitRNNLM, steps: int) -> list[dict[str, torch.Tensor]]:
    """`steps` SGD steps on the tiny windows; the raw weights after each step."""
    optimizer = torch.optim.SGD(module.net.parameters(), lr=0.5)
    windows, history = _windows(), []
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer
    module.train().on_train_epoch_start()
    for i in range(steps):
        optimizer.zero_grad()
        module.training_step(windows[i % len(windows)], i).backward()
        optimizer.step()
        module._update_average()
        history.append({k: v.detach().clone() for k, v in module.net.state_dict().items()})
    return history


def test_the_average_follows_the_weights_and_is_what_evaluation_and_export_use(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    module = _regularised(ema_decay=0.9)
    assert module.average is not None
    average = {k: v.clone() for k, v in module.net.state_dict().items()}
    for n, weights in enumerate(_train_steps(module, 12)):
        decay = min(0.9, (1 + n) / (10 + n))
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in average}
    for key, value in module.average.state_dict().items():
        torch.testing.assert_close(value, average[key], msg=key)
    assert int(module.average_steps) == 12
    assert not torch.allclose(module.average.rnn.weight_hh_l0, module.net.rnn.weight_hh_l0)
    # Validation runs the average.
    stream = np.random.default_rng(2).integers(2, 23, size=60).astype(np.int32)
    module.eval()
    expected = LitRNNLM.of(module.average.config, shipped_params().train).eval()
    expected.net.load_state_dict(module.average.state_dict())
    assert _eval_nll(module, stream, 16) == pytest.approx(_eval_nll(expected, stream, 16))
    # The checkpoint holds both; export takes the average.
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
               checkpoint)  # fmt: skip
    exported = load_checkpoint(checkpoint)
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, module.average.state_dict()[key], msg=key)


def test_averaging_continues_from_a_loaded_checkpoint() -> None:
    """The average and its step count are state: a module loaded from a checkpoint continues
    them (the e2e resume test checks a whole interrupted training)."""
    torch.manual_seed(0)
    running = _regularised(ema_decay=0.95)
    _train_steps(running, 3)
    loaded = _regularised(ema_decay=0.95)
    loaded.load_state_dict(running.state_dict())  # as Lightning restores a checkpoint
    loaded.on_load_checkpoint({})
    for module in (running, loaded):
        with torch.no_grad():
            for param in module.net.parameters():
                param.add_(0.25)
        module._update_average()
    assert int(loaded.average_steps) == int(running.average_steps) == 4
    assert running.average is not None and loaded.average is not None
    for key, value in loaded.average.state_dict().items():
        torch.testing.assert_close(value, running.average.state_dict()[key], msg=key)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_adam_runs_fused_on_cpu_with_the_unfused_update(kind: str) -> None:
    """Adam/AdamW take torch's fused kernel on CPU (one kernel per step, faster); the weights
    after a few steps are those of the plain (foreach) optimizer up to rounding. SGD stays as
    it is."""
    torch.manual_seed(0)
    module = _regularised(optimizer=kind, lr_schedule="plateau", weight_decay=0.01)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(
        optimizer, torch.optim.SGD if kind == "sgd" else torch.optim.Adam | torch.optim.AdamW
    )
    assert optimizer.defaults.get("fused") is (None if kind == "sgd" else True)
    twin = _regularised(optimizer=kind, lr_schedule="plateau", weight_decay=0.01)
    twin.load_state_dict(module.state_dict())
    plain = type(optimizer)(twin.net.parameters(), lr=optimizer.defaults["lr"],
                            weight_decay=0.01, foreach=True)  # fmt: skip
    initial = {k: v.clone() for k, v in module.net.named_parameters()}
    windows = _windows()
    for m in (module, twin):
        m.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer
        m.train().on_train_epoch_start()
    for i in range(4):
        for m, opt in ((module, optimizer), (twin, plain)):
            opt.zero_grad()
            m.training_step(windows[i], i).backward()
            opt.step()
    for (name, got), want in zip(module.net.named_parameters(), twin.net.parameters(), strict=True):
        assert not torch.equal(got, initial[name])  # it trained
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
