"""Model files: final_model.pt carries the weights evaluation used (the EMA average when EMA is on), and a model file
round-trips its weights, config and class names. Real models, real torch.save/torch.load; no Ray."""
from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distributed import modelfile
from distributed.config import TrainConfig
from distributed.models import create_model

CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]  # FER2013's order, not sorted


def trained_state(cfg: TrainConfig, steps: int = 5):
    """A few optimizer steps, built and stored as train.py does: the net, its EMA (AveragedModel over parameters and
    buffers) and the training_state a checkpoint holds -> (state, best model blob, net, ema or None)."""
    torch.manual_seed(0)
    net = create_model(cfg.model, len(CLASSES), in_channels=cfg.in_channels, dropout=cfg.dropout)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ema = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
           if cfg.ema_decay > 0 else None)
    net.train()
    for _ in range(steps):
        x, y = torch.randn(16, cfg.in_channels, 48, 48), torch.randint(0, len(CLASSES), (16,))
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(net)
    scored = ema.module if ema is not None else net
    best = modelfile.model_blob(scored, cfg, CLASSES, {"val_acc": 0.5, "epoch": steps})
    state = modelfile.training_state(steps, [modelfile.model_state(net, optimizer, ema)], {"value": 0.5, "epoch": 1},
                                     0, [{"epoch": steps, "val_acc": 0.5}])
    return state, best, net, ema


def write_final(tmp_path, state: dict, best: dict):
    """What `emotune train` does at the end: the checkpoint through save_state/load_state, then final_model.pt."""
    modelfile.save_state(tmp_path, state, best)
    state, best = modelfile.load_state(tmp_path)
    path = tmp_path / modelfile.FINAL_FILE
    modelfile.save_model(path, modelfile.final_blob(state, best))  # as run.py writes it
    return path


def outputs(net: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    x = torch.randn(8, 1, 48, 48, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return net.eval()(x)


def test_final_model_holds_the_ema_weights(tmp_path):
    cfg = TrainConfig(model="small_cnn", ema_decay=0.9)
    state, best, net, ema = trained_state(cfg)
    assert any(k.startswith("module.") for k in state["ema"]) and "n_averaged" in state["ema"]  # what is rewritten

    loaded, _, names, metrics = modelfile.load_model(write_final(tmp_path, state, best))

    final = modelfile.final_weights(modelfile.load_state(tmp_path)[0])
    assert set(final) == set(net.state_dict())  # no "module." prefix, no n_averaged: exactly the net's keys
    ema_weights = ema.module.state_dict()
    assert all(torch.equal(final[k], ema_weights[k]) for k in final)
    assert torch.equal(outputs(loaded), outputs(ema.module))
    # The EMA really differs from the last step's weights here, so the check above tells the two apart.
    assert not torch.equal(outputs(loaded), outputs(net))
    assert names == CLASSES and metrics == {"epoch": 5, "val_acc": 0.5}


def test_final_model_without_ema_is_the_last_weights(tmp_path):
    cfg = TrainConfig(model="small_cnn", ema_decay=0.0)
    state, best, net, _ = trained_state(cfg)
    loaded, _, _, _ = modelfile.load_model(write_final(tmp_path, state, best))
    assert torch.equal(outputs(loaded), outputs(net))


def test_final_model_scores_like_the_loops_last_epoch(tmp_path):
    """The real loop with EMA: final_model.pt scores on the validation split what the last epoch reported."""
    from distributed.data import decode_data
    from distributed.evaluate import predict
    from distributed.splits import make_splits
    from distributed.train import LocalRun, train_loop

    cfg = TrainConfig(model="small_cnn", epochs=2, batch_size=64, train_limit=280, augment=False, lr_head=3e-3,
                      lr_backbone=3e-3, ema_decay=0.9, seed=0)
    data = decode_data("synthetic", seed=0)
    run = LocalRun(device="cpu", checkpoint_dir=tmp_path)
    train_loop(cfg, data, run)
    state, best = modelfile.load_state(tmp_path)
    path = tmp_path / modelfile.FINAL_FILE
    modelfile.save_model(path, modelfile.final_blob(state, best))  # as run.py writes it

    net, loaded, _, metrics = modelfile.load_model(path)
    splits = make_splits(data, cfg)
    logits = predict(net, torch.from_numpy(splits.val_x), loaded, torch.device("cpu"))
    y = torch.from_numpy(splits.val_y).long()
    last = run.reports[-1]
    # The loss, not only the accuracy: on a two-epoch run the raw and the EMA weights can pick the same classes.
    assert torch.nn.functional.cross_entropy(logits, y).item() == pytest.approx(last["val_loss"], rel=1e-6)
    assert float((logits.argmax(1).numpy() == splits.val_y).mean()) == pytest.approx(last["val_acc"], abs=1e-9)
    assert metrics["epoch"] == 2


def test_model_file_round_trip_keeps_weights_config_and_class_names(tmp_path):
    cfg = TrainConfig(model="small_cnn", dropout=0.3, ema_decay=0.0, lr_head=2e-3, mixup_alpha=0.2)
    _, _, net, _ = trained_state(cfg, steps=2)
    path = tmp_path / "model.pt"
    modelfile.save_model(path, modelfile.model_blob(net, cfg, CLASSES, {"val_acc": 0.75, "node": "host-1"}))

    loaded, loaded_cfg, names, metrics = modelfile.load_model(path)
    assert loaded_cfg == cfg and loaded_cfg.to_dict() == cfg.to_dict()
    assert names == CLASSES
    assert metrics == {"val_acc": 0.75}  # only numbers are kept
    assert not loaded.training
    assert torch.equal(outputs(loaded), outputs(net))
