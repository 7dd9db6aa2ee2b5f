"""vqlab: an interactive study lab for vector quantization (VQ) of neural-network weights.

    import vqlab
    model = vqlab.get_model("lenet5")
    vqlab.fit(model, vqlab.load_dataset("fashion-mnist"), epochs=1)
    report = vqlab.quantize_(model, vqlab.VQConfig(k=256, d=4))   # swaps layers in place
    vqlab.compressed_size(model).ratio

Every method is a config (`vqlab.config.QuantConfig`) plus a handler and a weight code (`vqlab.codes.WeightCode`)
held by the one pair of quantized layers (`QuantizedLinear`, `QuantizedConv2d`); `quantize_` decides which layers
(`filter_fn`, `overrides`), and `compressed_size`, `save`/`load` and `count_flops` ask the code.  The built-in
methods (`vqlab.methods`: vq, uniform, gong, lattice, vq4all, qaf) are registered on import; their configs are
here: VQConfig, UniformConfig, BinaryConfig, ScalarConfig, PQConfig, RVQConfig, LatticeConfig, VQ4ALLConfig,
QAFConfig.

Submodules, in the order they import each other: utils, checks, dtypes, bits, distributed, codebook, kernels,
codes, layers, config, quantize, methods, flops, size, architecture, legacy, io, data, models, train, recipes,
experiments, widgets, bench.
"""
from .utils import default_device, fast_mode, seed_everything
from .bits import bits_for, effective_bits_per_weight, index_bits_per_weight
from .dtypes import index_dtype
from .codebook import (Codebook, KMeansResult, PQResult, RVQResult, assign, decode, kmeans, pq_decode,
                       product_quantize, residual_quantize, rvq_decode)
from .codes import CodeSize, WeightCode, register_code
from .layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from .config import QuantConfig, register_handler
from .quantize import all_layers, keep_first_last, quantize_, quantize_layer, set_submodule
from .methods.vq import VQCode, VQConfig, VQConv2d, VQLinear
from .methods.vq_simd import SimdCode, pack_simd_
from .methods.vq_simd_conv import SimdConvCode
from .methods.uniform import UniformConfig, uniform_quantize_
from .methods.gong import BinaryConfig, PQConfig, RVQConfig, ScalarConfig
from .methods.lattice import LatticeConfig
from .methods.vq4all import VQ4ALLConfig
from .methods.qaf import QAFConfig
from .flops import count_flops
from .size import SizeReport, compressed_size
from .io import VQFileError, load, save
from .data import DatasetNotFoundError, dataset_info, load_dataset, loader, pick_dataset
from .models import default_input_shape, get_model
from .train import NonFiniteLossError, evaluate, fit, predict, train_or_load
from .recipes import CompressReport, compress

__version__ = "0.1.0"
__all__ = [
    "default_device", "fast_mode", "seed_everything", "bits_for", "effective_bits_per_weight", "index_bits_per_weight", "index_dtype",
    "Codebook", "KMeansResult", "PQResult", "RVQResult", "assign", "decode", "kmeans", "pq_decode", "product_quantize",
    "residual_quantize", "rvq_decode", "CodeSize", "WeightCode", "register_code", "QuantizedConv2d", "QuantizedLayer",
    "QuantizedLinear", "QuantConfig", "register_handler", "all_layers", "keep_first_last", "quantize_",
    "quantize_layer", "set_submodule", "VQCode", "VQConfig", "VQConv2d", "VQLinear", "SimdCode", "SimdConvCode", "pack_simd_",
    "UniformConfig", "uniform_quantize_", "BinaryConfig", "PQConfig", "RVQConfig", "ScalarConfig", "LatticeConfig",
    "VQ4ALLConfig", "QAFConfig", "count_flops", "SizeReport", "compressed_size", "VQFileError", "load", "save",
    "DatasetNotFoundError", "dataset_info", "load_dataset", "loader", "pick_dataset", "default_input_shape", "get_model",
    "NonFiniteLossError", "evaluate", "fit", "predict", "train_or_load", "CompressReport", "compress",
]
