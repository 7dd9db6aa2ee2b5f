"""vqlab: an interactive study lab for vector quantization (VQ) of neural-network weights.

    import vqlab
    model = vqlab.get_model("lenet5")
    vqlab.fit(model, vqlab.load_dataset("fashion-mnist"), epochs=1)
"""
from ._utils import bits_for, default_device, index_dtype, seed_everything
from .data import DatasetNotFoundError, dataset_info, load_dataset, loader
from .models import default_input_shape, get_model
from .train import evaluate, fit, predict, train_or_load

__version__ = "0.1.0"
