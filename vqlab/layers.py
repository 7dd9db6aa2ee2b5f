"""The one pair of quantized layers: `QuantizedLinear` and `QuantizedConv2d`, drop-in replacements for nn.Linear /
nn.Conv2d whose weight is a `vqlab.codes.WeightCode` (`layer.code`), whatever the method.

The layer owns the geometry and the row layout; the code owns the stored numbers and the products:

    QuantizedLinear     rows = weight, zero-padded at the end of each row to n_pad = code.shape[1] >= in_features
    QuantizedConv2d     segment="kernel" (default): rows = weight.reshape(out, -1), order (cin/groups, kh, kw),
                            zero-padded at the end to n_pad
                        segment="input": rows = weight.permute(0, 2, 3, 1), order (kh, kw, cin_pad), the input
                            channels of every conv group zero-padded to cin_pad = n_pad / (kh * kw), so a segment of
                            d consecutive values is d input channels at one kernel position (VQ's layout)

Forward.  Training: the weight rebuilt from `code.train_rows()` through F.linear / F.conv2d (gradients reach the
code's trainable parts).  Eval: `code.matmul(x)` (Linear, x zero-padded to n_pad) or `code.conv2d(x, layer)`
(Conv2d, x padded as `conv_padding` / `pre_pad` say), each of which may return None for "rebuild the weight and
run the dense product".  A Conv2d supports stride, padding (ints, 'same', 'valid'), dilation, groups, bias and
every padding_mode, like nn.Conv2d.

Attributes a code lists in `layer_attrs` read and write through the layer (`layer.codebook` is
`layer.code.codebook` for a VQ code), so a layer is used the same way whatever its code.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_choice, check_instance, check_int
from .codes import WeightCode, add_bias
from .kernels.flops import conv_out_hw

__all__ = ["QuantizedLayer", "QuantizedLinear", "QuantizedConv2d", "quantized_layer", "check_layer",
           "layer_class", "PADDING_MODES"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


_MAX_SIZE = (1 << 31) - 1


def _int_pair(field: str, v, low: int) -> tuple[int, int]:
    """An int or a pair of ints (nn.Conv2d's kernel_size / stride / padding / dilation) in [low, 2**31) -> (a, b);
    ValueError naming the field and the value otherwise (a float, a string, a bool, a negative or huge value)."""
    items = list(v) if isinstance(v, (tuple, list, torch.Size)) else [v, v]
    if len(items) != 2:
        raise ValueError(f"{field} must be an int or a pair of ints, got {v!r}")
    return tuple(check_int(field, t, low, _MAX_SIZE) for t in items)


def _resolve_conv_padding(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """nn.Conv2d padding (ints or 'same'/'valid') -> F.pad order (left, right, top, bottom)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        total = [dil * (k - 1) for k, dil in zip(kernel_size, dilation)]  # (h, w)
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    ph, pw = padding
    return (pw, pw, ph, ph)


class QuantizedLayer(nn.Module):
    """What both quantized layers share: the code, the row layout, the size and FLOP questions, validation."""

    code: WeightCode

    # -- reading and writing through to the code (`WeightCode.layer_attrs`)
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            code = self.__dict__.get("_modules", {}).get("code")
            if code is not None and name in type(code).layer_attrs:
                return getattr(code, name)
            raise

    def __setattr__(self, name: str, value) -> None:
        code = self.__dict__.get("_modules", {}).get("code")
        if code is not None and name in type(code).layer_attrs:
            setattr(code, name, value)
        else:
            super().__setattr__(name, value)

    def _set_code(self, code: WeightCode) -> None:
        check_instance(f"{type(self).__name__} code", code, WeightCode, "vqlab WeightCode")
        if code.shape[0] != self.out_dim or code.shape[1] < self.n:
            raise ValueError(f"{type(self).__name__}: code rows {tuple(code.shape)} do not fit its geometry: "
                             f"out_dim={self.out_dim}, n={self.n} (n <= n_pad)")
        self.code = code

    # -- the row layout
    @property
    def n_pad(self) -> int:
        """Stored row length: the code's rows (>= n, the dense layer's row length)."""
        return self.code.shape[1]

    @property
    def weight_numel(self) -> int:
        """Weights of the dense layer this one stands for (padding excluded)."""
        return self.out_dim * self.n

    def dequantize(self) -> torch.Tensor:
        """The dense weight in nn.Linear / nn.Conv2d shape (padding removed), differentiable w.r.t. the code."""
        return self.rows_to_weight(self.code.rows())

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    @property
    def bits_per_weight(self) -> float | None:
        """Index bits per weight of the dense layer: the code's bits per stored value times n_pad / n (row padding
        counted)."""
        bits = self.code.describe()["bits_per_weight"]
        return None if bits is None else bits * self.n_pad / self.n

    def validate(self) -> None:
        """Raise ValueError unless the code fits this layer and its values are usable."""
        if tuple(self.code.shape) != (self.out_dim, self.n_pad) or self.n_pad < self.n:
            raise ValueError(f"{type(self).__name__}: code rows {tuple(self.code.shape)} do not fit its geometry: "
                             f"out_dim={self.out_dim}, n={self.n}, n_pad={self.n_pad} (n <= n_pad)")
        self.code.validate()

    def after_load(self) -> None:
        """Let the code rebuild training-only state after `vqlab.load` filled the stored tensors."""
        self.code.after_load()

    def _bias_from(self, module: nn.Module) -> None:
        if module.bias is not None:
            self.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)


class QuantizedLinear(QuantizedLayer):
    """nn.Linear whose weight is a WeightCode with rows (out_features, n_pad >= in_features).
    x: (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, code: WeightCode, device=None,
                 dtype=None):
        super().__init__()
        self.in_features = check_int("QuantizedLinear.in_features", in_features, 1)
        self.out_features = check_int("QuantizedLinear.out_features", out_features, 1)
        self.out_dim, self.n = out_features, in_features
        self._set_code(code)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_code(cls, module: nn.Linear, code: WeightCode) -> "QuantizedLinear":
        """Wrap `code` (rows = module.weight's, padded) with module's bias (copied) and training mode."""
        layer = cls(module.in_features, module.out_features, module.bias is not None, code=code)
        layer._bias_from(module)
        return layer.train(module.training)

    def config(self) -> dict:
        """The constructor arguments as JSON data (the code is stored beside them)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def weight_to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) -> (out, n_pad)."""
        return F.pad(weight, (0, self.n_pad - self.n))

    def rows_to_weight(self, rows: torch.Tensor) -> torch.Tensor:
        """(out, n_pad) -> (out, in)."""
        return rows[:, : self.n]

    def flops(self, rows: int, x_shape: tuple[int, ...] | None = None) -> tuple[int, int]:
        """(table, accumulate) FLOPs for `rows` input vectors: the code's count when it has a product of its own,
        else a dense product's."""
        return self.code.flops(rows, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.linear(x, self.rows_to_weight(self.code.train_rows().to(x.dtype)), self.bias)
        xp = F.pad(x, (0, self.n_pad - self.n)) if self.n_pad != self.n else x
        y = self.code.matmul(xp, self.bias)
        return F.linear(x, self.dequantize().to(x.dtype), self.bias) if y is None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedConv2d(QuantizedLayer):
    """nn.Conv2d whose weight is a WeightCode with rows (out_channels, n_pad) in the layout `segment` (module
    docstring).  x: (B, in_channels, H, W) -> (B, out_channels, Ho, Wo)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, code: WeightCode,
                 segment: str = "kernel", device=None, dtype=None):
        super().__init__()
        self.in_channels = check_int("QuantizedConv2d.in_channels", in_channels, 1)
        self.out_channels = check_int("QuantizedConv2d.out_channels", out_channels, 1)
        self.groups = check_int("QuantizedConv2d.groups", groups, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"QuantizedConv2d: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.kernel_size = _int_pair("QuantizedConv2d.kernel_size", kernel_size, 1)
        self.stride = _int_pair("QuantizedConv2d.stride", stride, 1)
        self.dilation = _int_pair("QuantizedConv2d.dilation", dilation, 1)
        if isinstance(padding, str):
            check_choice("QuantizedConv2d.padding", padding, ("same", "valid"))
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"QuantizedConv2d.padding='same' needs stride 1, got stride={self.stride}")
            self.padding = padding
        else:
            self.padding = _int_pair("QuantizedConv2d.padding", padding, 0)
        self.padding_mode = check_choice("QuantizedConv2d.padding_mode", padding_mode, PADDING_MODES)
        self.segment = check_choice("QuantizedConv2d.segment", segment, ("kernel", "input"))
        kh, kw = self.kernel_size
        self.out_dim, self.n = out_channels, in_channels // groups * kh * kw
        self._set_code(code)
        if segment == "input" and code.shape[1] % (kh * kw):
            raise ValueError(f"QuantizedConv2d: segment='input' rows of {code.shape[1]} values are not "
                             f"{kh} x {kw} kernel positions of whole channel runs")
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        # symmetric zero padding goes to the conv itself; anything else is done by F.pad first
        lr_tb = _resolve_conv_padding(self.padding, self.kernel_size, self.dilation)
        if padding_mode == "zeros" and lr_tb[0] == lr_tb[1] and lr_tb[2] == lr_tb[3]:
            self.conv_padding, self.pre_pad = (lr_tb[2], lr_tb[0]), None
        else:
            self.conv_padding, self.pre_pad = (0, 0), lr_tb

    @classmethod
    def from_code(cls, module: nn.Conv2d, code: WeightCode, segment: str = "kernel") -> "QuantizedConv2d":
        """Wrap `code` (rows = module.weight's in the layout `segment`) with module's geometry, bias and mode."""
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.bias is not None, module.padding_mode, code=code,
                    segment=segment)
        layer._bias_from(module)
        return layer.train(module.training)

    def config(self) -> dict:
        """The constructor arguments as JSON data (the code is stored beside them)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "padding_mode": self.padding_mode, "segment": self.segment}

    @property
    def cin_pad(self) -> int:
        """Input channels per conv group as the rows see them (segment="input": padded; else in_channels/groups)."""
        kh, kw = self.kernel_size
        return self.n_pad // (kh * kw) if self.segment == "input" else self.in_channels // self.groups

    def weight_to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, cin/groups, kh, kw) -> (out, n_pad) in this layer's layout."""
        out = weight.shape[0]
        if self.segment == "input":
            w = weight.permute(0, 2, 3, 1)                               # (out, kh, kw, cin_g)
            return F.pad(w, (0, self.cin_pad - w.shape[-1])).reshape(out, -1)
        return F.pad(weight.reshape(out, -1), (0, self.n_pad - self.n))

    def rows_to_weight(self, rows: torch.Tensor) -> torch.Tensor:
        """(out, n_pad) -> (out, cin/groups, kh, kw)."""
        out, (kh, kw), cin_g = rows.shape[0], self.kernel_size, self.in_channels // self.groups
        if self.segment == "input":
            return rows.reshape(out, kh, kw, self.cin_pad)[..., :cin_g].permute(0, 3, 1, 2)
        return rows[:, : self.n].reshape(out, cin_g, kh, kw)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the convolution with `conv_padding` needs it (F.pad for 'same' with even kernels and for
        reflect / replicate / circular padding modes)."""
        if self.pre_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self.pre_pad, mode=mode)
        return x

    def im2col_applies(self) -> bool:
        """Whether `im2col_matmul` can run this convolution: one conv group, "kernel" rows, no row padding."""
        return self.groups == 1 and self.segment == "kernel" and self.n_pad == self.n

    def im2col_matmul(self, x: torch.Tensor, matmul) -> torch.Tensor | None:
        """The convolution as matmul(im2col rows): x (B, cin, H, W) padded by `pad_input` -> unfold (B, Ho*Wo,
        cin*kh*kw), whose column order (cin, kh, kw) is the "kernel" layout's -> matmul -> (B, out, Ho, Wo), plus
        the bias.  None where it does not apply (`im2col_applies`)."""
        if not self.im2col_applies() or x.dim() != 4:
            return None
        ho, wo = conv_out_hw(x.shape, self.kernel_size, self.stride, self.conv_padding, self.dilation)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.conv_padding, self.stride)   # (B, n, Ho*Wo)
        y = matmul(cols.transpose(1, 2))                                                     # (B, Ho*Wo, out)
        return add_bias(y.transpose(1, 2).reshape(x.shape[0], self.out_channels, ho, wo), self.bias, conv=True)

    def flops(self, rows: int, x_shape: tuple[int, ...] | None = None) -> tuple[int, int]:
        """(table, accumulate) FLOPs for `rows` = batch * output positions (of an input of `x_shape`, which a code
        may need): the code's own convolution's count, else the dense convolution's."""
        own = self.code.conv_flops(self, None if x_shape is None else tuple(x_shape), rows)
        return own if own is not None else (0, 2 * rows * self.out_dim * self.n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pad_input(x)
        if self.training:
            w = self.rows_to_weight(self.code.train_rows().to(x.dtype))
            return F.conv2d(x, w, self.bias, self.stride, self.conv_padding, self.dilation, self.groups)
        y = self.code.conv2d(x, self)
        if y is None:
            return F.conv2d(x, self.dequantize().to(x.dtype), self.bias, self.stride, self.conv_padding,
                            self.dilation, self.groups)
        return y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.segment != "kernel":
            s += f", segment={self.segment!r}"
        return s + f", bias={self.bias is not None}"


# ---------------------------------------------------------------- what every method's handler needs

def _label(name: str | None, module: nn.Module) -> str:
    """How errors name a layer: "layer 'features.3' (Conv2d)"."""
    kind = type(module).__name__
    return f"layer {name!r} ({kind})" if name else f"{kind} layer"


def check_layer(module: nn.Module, name: str | None, method: str) -> None:
    """Raise unless `module` is an nn.Linear or nn.Conv2d with a float weight (what the quantized layers stand
    for); TypeError naming the layer and the method otherwise."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"{_label(name, module)}: {method} supports nn.Linear and nn.Conv2d, not "
                        f"{type(module).__name__}")


def layer_class(module: nn.Module) -> type[QuantizedLayer]:
    """QuantizedLinear for an nn.Linear, QuantizedConv2d for an nn.Conv2d; TypeError otherwise."""
    if isinstance(module, nn.Linear):
        return QuantizedLinear
    if isinstance(module, nn.Conv2d):
        return QuantizedConv2d
    raise TypeError(f"quantized layers stand for nn.Linear and nn.Conv2d, not {type(module).__name__}")


def quantized_layer(module: nn.Module, code: WeightCode, segment: str = "kernel") -> QuantizedLayer:
    """The quantized layer standing for `module` (nn.Linear or nn.Conv2d) with weight `code` (moved to the
    module's device), its bias and training mode; `segment` is a convolution's row layout."""
    code = code.to(module.weight.device)
    if isinstance(module, nn.Conv2d):
        return QuantizedConv2d.from_code(module, code, segment)
    return layer_class(module).from_code(module, code)
