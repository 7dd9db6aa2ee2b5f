import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from vqlab import VQConfig, get_model, quantize_
from vqlab.flops import count_flops, flop_ratio


def _torch_count(model, shape):
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(shape))
    return counter.get_total_flops()


@pytest.mark.parametrize("name,shape", [("lenet5", (2, 1, 28, 28)), ("resnet18", (1, 3, 224, 224))])
def test_dense_counts_equal_flop_counter_mode(name, shape):
    torch.manual_seed(0)
    model = torchvision.models.resnet18() if name == "resnet18" else get_model(name)
    df = count_flops(model, shape)
    assert df["dense_flops"].sum() == _torch_count(model, shape)
    assert (df["ratio"] == 1).all()


def test_lenet5_by_hand():
    df = count_flops(get_model("lenet5"), (1, 1, 28, 28)).set_index("layer")
    assert df.loc["features.0", "dense_flops"] == 2 * 28 * 28 * 8 * 25        # conv 1->8, 5x5, same padding
    assert df.loc["features.3", "dense_flops"] == 2 * 10 * 10 * 16 * 8 * 25   # conv 8->16, 5x5 on 14x14
    assert df.loc["classifier.1", "dense_flops"] == 2 * 400 * 120


def test_vq_model_counts_table_and_accumulate_and_flop_counter_mode_agrees():
    torch.manual_seed(0)
    model = get_model("lenet5")
    quantize_(model, VQConfig(k=64, d=4, iters=3), progress=False)
    df = count_flops(model, (3, 1, 28, 28)).set_index("layer")
    fc = df.loc["classifier.1"]                                  # m=120, n=400, rows=3
    assert fc["vq_table_flops"] == 2 * 3 * 400 * 64
    assert fc["vq_accum_flops"] == 3 * 120 * 400 // 4
    assert fc["ratio"] == pytest.approx(64 / 120 + 1 / (2 * 4))
    conv = df.loc["features.3"]                                  # 100 output positions per image
    assert conv["vq_table_flops"] == 2 * 3 * 100 * 200 * 64 and conv["vq_accum_flops"] == 3 * 100 * 16 * 200 // 4
    assert df["vq_flops"].sum() == _torch_count(model, (3, 1, 28, 28))
    assert flop_ratio(256, 4, 4096) == pytest.approx(256 / 4096 + 1 / 8)
    assert flop_ratio(64, 4, 120) == pytest.approx(fc["ratio"])        # one convention: the table's ratio
