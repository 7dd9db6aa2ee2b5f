"""vqlab: an interactive study lab for vector quantization (VQ) of neural-network weights.

    import vqlab
    model = vqlab.get_model("lenet5")
    vqlab.fit(model, vqlab.load_dataset("fashion-mnist"), epochs=1)
    report = vqlab.quantize_(model, vqlab.VQConfig(k=256, d=4))   # swaps layers in place
    vqlab.compressed_size(model).ratio

Submodules one level deep: codebook, layers, kernels, flops, size, io, quantize, baselines,
experiments, widgets, bench, data, models, train.
"""
from ._utils import bits_for, default_device, index_dtype, seed_everything
from .codebook import (Codebook, KMeansResult, PQResult, RVQResult, assign, decode, kmeans, pq_decode,
                       product_quantize, residual_quantize, rvq_decode)
from .data import DatasetNotFoundError, dataset_info, load_dataset, loader
from .io import load, save
from .layers import VQConv2d, VQLinear
from .models import default_input_shape, get_model
from .quantize import VQConfig, quantize_
from .size import SizeReport, compressed_size
from .train import evaluate, fit, predict, train_or_load

__version__ = "0.1.0"
