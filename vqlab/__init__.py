"""vqlab: an interactive study lab for vector quantization (VQ) of neural-network weights.

    import vqlab
    model = vqlab.get_model("lenet5")
    vqlab.fit(model, vqlab.load_dataset("fashion-mnist"), epochs=1)
    report = vqlab.quantize_(model, vqlab.VQConfig(k=256, d=4))   # swaps layers in place
    vqlab.compressed_size(model).ratio

A new quantization method is one module: a `WeightCode` subclass (`@register_code`), a config dataclass
and a handler (`@register_handler(Config)`) that returns `QuantizedLinear.from_code` / `QuantizedConv2d.from_code`
layers; `quantize_`, `compressed_size`, `save`/`load` and `count_flops` then work on it unchanged.

Submodules one level deep: codebook, quantized, layers, kernels, flops, bits, size, io, quantize, baselines,
experiments, widgets, bench, data, models, train, recipes (`vqlab.compress`: a size budget in one call), packed (`vqlab.pack_simd_`: K <= 16 layers
in the simd kernel's 4-bit layout for fast CPU inference).
"""
from ._utils import bits_for, default_device, index_dtype, seed_everything
from .codebook import (Codebook, KMeansResult, PQResult, RVQResult, assign, decode, kmeans, pq_decode,
                       product_quantize, residual_quantize, rvq_decode)
from .data import DatasetNotFoundError, dataset_info, load_dataset, loader
from .io import VQFileError, load, save
from .layers import VQCode, VQConv2d, VQLinear
from .models import default_input_shape, get_model
from .quantize import VQConfig, quantize_, register_handler
from .quantized import CodeSize, QuantizedConv2d, QuantizedLinear, WeightCode, register_code
from .baselines import UniformConfig, uniform_quantize_
from .flops import count_flops
from .size import SizeReport, compressed_size
from .train import NonFiniteLossError, evaluate, fit, predict, train_or_load
from .recipes import CompressReport, compress
from .packed import SimdCode, pack_simd_

__version__ = "0.1.0"
