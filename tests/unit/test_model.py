"""The plain network, the Lightning module's truncated BPTT and the data windows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnlm.config import ConfigError, Params
from rnnlm.datamodule import CorpusDataModule, StreamWindows
from rnnlm.lit_module import LitRNNLM
from rnnlm.model import RNNLM, RNNLMConfig, detach_state, state_names
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


@pytest.mark.parametrize("cell", CELLS)
def test_tiny_model_overfits_a_repeating_sequence(cell: str) -> None:
    torch.manual_seed(0)
    net = RNNLM(RNNLMConfig(**tiny_config(cell, embedding_dim=16, hidden_dim=16, num_layers=1)))
    pattern = torch.tensor([2, 5, 9, 4, 11, 7, 3, 8])
    stream = pattern.repeat(12)
    inputs, targets = stream[:-1].unsqueeze(0), stream[1:].unsqueeze(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    initial = None
    for _ in range(150):
        logits, _ = net(inputs, net.init_state(1))
        loss = F.cross_entropy(logits.reshape(-1, 23), targets.reshape(-1))
        initial = initial if initial is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert initial > 2.5  # about log(23) at the start
    assert loss.item() < 0.1


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
