import pytest
import torch

from vqlab.models import MODELS, default_input_shape, get_model

SMALL = ["lenet5", "cnn", "resnet20", "resnet32", "vit_tiny"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_forward_on_its_input_size(name):
    torch.manual_seed(0)
    shape = default_input_shape(name, in_channels=3)
    model = get_model(name, num_classes=7, in_channels=3).eval()
    with torch.no_grad():
        y = model(torch.randn(1, *shape))
    assert y.shape == (1, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("channels,size", [(1, 28), (1, 8), (3, 32)])
def test_small_models_take_grey_and_colour_inputs(name, channels, size):
    if name == "vit_tiny" and size % 4:
        size = 32
    model = get_model(name, in_channels=channels, input_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_resnet20_has_the_papers_parameter_count():
    # He et al. 2016, table 6: ResNet-20 has 0.27M parameters
    n = sum(p.numel() for p in get_model("resnet20", in_channels=3).parameters())
    assert 0.26e6 < n < 0.28e6


def test_weights_come_only_from_a_user_file(tmp_path):
    a = get_model("lenet5")
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = get_model("lenet5", weights=tmp_path / "w.pt")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        get_model("alexnet")
