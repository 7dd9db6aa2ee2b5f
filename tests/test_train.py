import pytest
import torch
import torch.nn as nn

from vqlab.data import load_dataset
from vqlab.models import get_model
from vqlab.methods.vq import VQConfig
from vqlab.quantize import quantize_
from vqlab.train import NonFiniteLossError, evaluate, fit

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


def test_fine_tuning_float16_codebooks_improves_and_keeps_dtype():
    # Adam stepping float16 codebooks directly turned every parameter into NaN (accuracy 0.10)
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = get_model("lenet5", in_channels=1, num_classes=10, input_size=8)
    fit(model, tr, epochs=2, lr=3e-3, batch_size=32, seed=0, progress=False, device="cpu")
    quantize_(model, VQConfig(k=16, d=4, iters=10, codebook_dtype="float16"), progress=False)
    before = evaluate(model, te, device="cpu")
    fit(model, tr, epochs=1, lr=1e-3, batch_size=32, seed=1, progress=False, device="cpu")
    after = evaluate(model, te, device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for name in ("features.3", "classifier.1", "classifier.3"):
        assert model.get_submodule(name).codebook.weight.dtype == torch.float16, name
    assert after >= before and after > 0.5, (before, after)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_train_through_float32_masters(dtype):
    # the codebook keeps its dtype and its Parameter object, moves, and stays finite (float16 went NaN)
    tr = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    quantize_(model, VQConfig(k=8, d=4, iters=3, codebook_dtype=dtype), progress=False)
    book = model.features[3].codebook.weight
    start = book.detach().clone()
    fit(model, tr, epochs=1, lr=1e-3, max_steps=5, progress=False, device="cpu")
    assert book.dtype == dtype and model.features[3].codebook.weight is book
    assert torch.isfinite(book).all() and not torch.equal(book, start)


class _NaNAfter(nn.Module):
    """Logits from a linear layer, NaN from forward number `bad` on."""

    def __init__(self, bad: int):
        super().__init__()
        self.fc, self.bad, self.calls = nn.Linear(64, 10), bad, 0

    def forward(self, x):
        self.calls += 1
        y = self.fc(x.flatten(1))
        return y * float("nan") if self.training and self.calls >= self.bad else y


def test_non_finite_loss_stops_fit_before_the_step():
    tr = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = _NaNAfter(bad=3)
    seen = []
    with pytest.raises(NonFiniteLossError, match=r"fit: loss is nan at step 3 of 11 \(epoch 1, lr=0\.0\d+\)") as err:
        fit(model, tr, epochs=1, batch_size=128, progress=False, device="cpu",
            on_step=lambda m, s: seen.append({k: v.clone() for k, v in m.state_dict().items()}))
    assert isinstance(err.value, FloatingPointError) and (err.value.step, err.value.epoch) == (3, 1)
    assert len(seen) == 2
    # no optimizer step was taken with the NaN loss: the weights are those after step 2
    assert all(torch.equal(v, seen[-1][k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_huge_lr_names_the_step_and_lr():
    tr = load_dataset("digits", "train")
    torch.manual_seed(0)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ of \d+ \(epoch 1, lr=\d(\.\d+)?e\+(29|30)\)"):
        fit(get_model("lenet5", input_size=8), tr, epochs=1, lr=1e30, progress=False, device="cpu")


def test_recalibrate_batchnorm_equals_the_average_of_the_batch_statistics():
    """The re-estimated running mean/variance are the plain average of the per-batch statistics of the seeded
    batches; the weights, the modes and the momentum are what they were."""
    from vqlab.train import recalibrate_batchnorm_

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.3)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Dropout(0.5), nn.Flatten()).eval()
    ds = torch.utils.data.TensorDataset(torch.randn(100, 1, 6, 6) * 3 + 1, torch.zeros(100, dtype=torch.long))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_batchnorm_(model, ds, batches=4, batch_size=20, seed=7) == 1
    order = torch.randperm(100, generator=torch.Generator().manual_seed(7))[:80]
    with torch.no_grad():
        acts = [conv(ds.tensors[0][order[s:s + 20]]).transpose(0, 1).reshape(3, -1) for s in range(0, 80, 20)]
    torch.testing.assert_close(bn.running_mean, torch.stack([a.mean(1) for a in acts]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([a.var(1) for a in acts]).mean(0))
    assert not model.training and not bn.training and bn.momentum == 0.3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    # the model's other modules stayed in eval mode: dropout did not run (two calls agree)
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="batches"):
        recalibrate_batchnorm_(model, ds, batches=0)
    assert recalibrate_batchnorm_(nn.Sequential(nn.Linear(2, 2)), ds) == 0
