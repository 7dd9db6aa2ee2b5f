import pytest
import torch

from vqlab.data import load_dataset
from vqlab.models import get_model
from vqlab.train import evaluate, fit

from conftest import needs_fashion


def test_lenet5_learns_digits():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    before = evaluate(model, te)
    hist = fit(model, tr, epochs=10, lr=3e-3, batch_size=32, seed=0, progress=False)
    acc = evaluate(model, te)
    assert list(hist.columns) == ["epoch", "steps", "loss", "train_acc", "val_acc", "seconds"]
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    assert before < 0.3 and acc >= 0.90, (before, acc)


@needs_fashion
@pytest.mark.slow
def test_lenet5_one_epoch_fashion_mnist_reaches_85_percent():
    tr, te = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    torch.manual_seed(0)
    model = get_model("lenet5")
    fit(model, tr, epochs=1, lr=3e-3, batch_size=64, seed=0, progress=False)
    acc = evaluate(model, te)
    assert acc >= 0.85, acc


def test_same_seed_gives_identical_weights():
    tr = load_dataset("digits", "train")
    states = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)
        model = get_model("cnn", input_size=8)
        fit(model, tr, epochs=1, batch_size=64, seed=seed, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_max_steps_and_on_step_and_bad_epochs():
    tr = load_dataset("digits", "train")
    seen = []
    hist = fit(get_model("lenet5", input_size=8), tr, epochs=3, max_steps=5, progress=False,
               on_step=lambda m, s: seen.append(s))
    assert seen == [1, 2, 3, 4, 5] and hist["steps"].iloc[-1] == 5
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        fit(get_model("lenet5", input_size=8), tr, epochs=0)
