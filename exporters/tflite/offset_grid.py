"""The offset grid (each block of a weight on its own min..max, GGUF Q4_1's grid,
weights.quantize_min_max) on LiteRT's kernels, for decoder LMs.

TFLite's int4 blocks are symmetric (no zero points), and ai_edge_quantizer takes a block's scale
from its largest weight (max|w| / 7), so a block that reaches code -8 would be rounded again. A
4-bit layer is therefore split before conversion, as ExecuTorch's is for XNNPACK:

    linear: y = x·W_symᵀ + sums(x)·Mᵀ + b        table: lookup(W_sym) + lookup(M) spread over each block

W_sym = scale·c with c in -8..7 and bf16 scales (LiteRT keeps 7 mantissa bits of a block scale),
stored int4 blockwise: `store_codes` writes its codes and scales over ai_edge_quantizer's own, so
the .tflite holds the grid exactly. What the converter and the quantizer make of a symmetric part's
float weight is only the op's layout, so until the codes are stored the part holds the layer's own
weight (no second float copy of the model at the conversion's peak), unless a layer off the grid
holds it too. `store_codes` then writes the codes, one layer at a time, as `Split.hold_grid` gives
them and writes W_sym over that weight for the eager reference; `Split.restore` puts the weight
back from a file. M holds the blocks' midpoints (minimum + 8·scale), stored int8 per channel by
ai_edge_quantizer as any int8 layer (the reference rounds them the same way).
sums(x) is each input block's sum (RESHAPE + SUM). A tied table and LM head share W_sym and M,
which the quantizer stores once.

Decoder LMs only: the converter folds an encoder's LayerNorm affine into the linears it feeds
(exporters/tflite/weights.py), which would change W_sym after its codes were chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from edgepack.errors import BackendError, CaptureAltered
from edgepack.exporters.tflite.weights import writable_buffer
from edgepack.exporters.weights import split_min_max
from edgepack.quant import WeightQuant

BLOCK_SCALE = torch.bfloat16
# LiteRT stores block scales in fp16: a bf16 scale below fp16's normal range would round again.
SMALLEST_SCALE = 2.0 ** -14
OFFSETS = WeightQuant(bits=8, group_size=None)  # how M is stored


class OffsetLinear(nn.Module):
    def __init__(self, symmetric: nn.Linear, offsets: nn.Linear, block: int):
        super().__init__()
        self.symmetric, self.offsets, self.block = symmetric, offsets, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.symmetric(x) + self.offsets(x.reshape(*x.shape[:-1], -1, self.block).sum(dim=-1))


class OffsetTable(nn.Module):
    def __init__(self, symmetric: nn.Embedding, offsets: nn.Embedding, block: int):
        super().__init__()
        self.symmetric, self.offsets, self.block = symmetric, offsets, block

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.symmetric(ids) + self.offsets(ids).repeat_interleave(self.block, dim=-1)


@dataclass
class Split:
    """What split_layers did: each symmetric part (by its name) and the weight and block its grid
    is computed from, the offset layers (stored int8 per channel), and what `restore` puts back:
    the layers, and the weights `hold_grid` wrote over (each saved in a file)."""

    symmetric: dict[str, nn.Module] = field(default_factory=dict)
    sources: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    offsets: dict[str, WeightQuant] = field(default_factory=dict)
    originals: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    saved: list[tuple[torch.Tensor, Path]] = field(default_factory=list)

    def hold_grid(self, folder: Path) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """The int4 codes and block scales of each weight on the grid, one weight at a time, with
        the symmetric parts that hold it (a tied table and LM head: two); each part's weight
        becomes W_sym (its codes times its scales) as it is given, what the .tflite holds once
        `store_codes` wrote them. A part holding its layer's own weight has it written over in
        place, the weight saved in `folder` until `restore`: a second float copy of a 1B model
        beside the first is 4.6 GiB. The codes are computed here again rather than kept since the
        split (1 byte a weight)."""
        parts: dict[int, list[str]] = {}
        for name, (weight, _) in self.sources.items():
            parts.setdefault(id(weight), []).append(name)
        for names in parts.values():
            (source, block), held = self.sources[names[0]], self.symmetric[names[0]].weight
            _, codes, scale = _parts(source, block)
            yield names, codes, scale
            if held is source:  # otherwise it holds W_sym since the split
                path = folder / f"weight-{len(self.saved)}.raw"
                source.detach().numpy().tofile(path)
                self.saved.append((source, path))
                with torch.no_grad():
                    source.copy_(_image(codes, scale))

    def restore(self) -> None:
        """The split layers and every weight `hold_grid` wrote over put back, each weight read
        whole before it is written (one that cannot be read keeps W_sym, never half of each)."""
        for parent, child, layer in reversed(self.originals):
            setattr(parent, child, layer)
        lost = []
        with torch.no_grad():
            for weight, path in self.saved:
                try:
                    weight.copy_(torch.from_numpy(np.fromfile(path, weight.detach().numpy().dtype)).reshape(weight.shape))
                except (OSError, ValueError, RuntimeError) as e:  # unreadable, or cut short
                    lost.append(f"{path} ({type(e).__name__}: {e})")
        self.saved.clear()
        if lost:
            raise CaptureAltered(
                f"tflite: could not read back {len(lost)} of the model's weights it had set aside while it stored "
                f"the offset grid, first {lost[0]}; the model in memory now holds rounded weights, so the export "
                "stops rather than lower another backend from them",
                hint="check the disk that holds the temporary folder (TMPDIR) and run the export again")


def on_offset_grid(layer: nn.Module, wq: WeightQuant) -> bool:
    # subclasses (Gemma 3's scaled table) compute more than a lookup: they keep the symmetric grid
    return type(layer) in (nn.Linear, nn.Embedding) and wq.bits == 4 and wq.group_size is not None


def _parts(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """M [out, blocks] (float32), and W_sym's int4 codes [out, in] and block scales [out, blocks]."""
    codes, scale, offsets = split_min_max(weight.detach().float(), block, BLOCK_SCALE, SMALLEST_SCALE)
    return offsets, codes.numpy(), scale.numpy()


def _image(codes: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """W_sym [out, in] in float32: each block's codes times its scale."""
    rows, cols = codes.shape
    blocks = torch.from_numpy(codes).float().reshape(rows, scale.shape[1], -1)
    return (blocks * torch.from_numpy(scale).unsqueeze(-1)).reshape(rows, cols)


def split_layers(module: nn.Module, layers: dict[str, WeightQuant]) -> Split:
    """Replace, in place, each layer of `layers` (name -> storage) that goes on the offset grid by
    its split; `Split.restore` puts the originals back."""
    split, made = Split(), {}
    splits = [name for name, wq in layers.items() if on_offset_grid(module.get_submodule(name), wq)]
    # A weight a layer off the grid also holds (Gemma's scaled table, tied to its split LM head)
    # cannot be the symmetric part's: the quantizer would store the two as one, then the codes
    # would be written over the table's.
    unsplit = {id(m.weight) for name, m in module.named_modules()
               if name not in splits and isinstance(getattr(m, "weight", None), torch.Tensor)}
    for name in splits:
        layer, block = module.get_submodule(name), layers[name].group_size
        if id(layer.weight) not in made:  # a tied table and LM head: one split
            offsets, codes, scale = _parts(layer.weight, block)
            symmetric = (nn.Parameter(_image(codes, scale), requires_grad=False) if id(layer.weight) in unsplit
                         else layer.weight)  # the layer's own weight until hold_grid
            made[id(layer.weight)] = (symmetric, nn.Parameter(offsets, requires_grad=False))
        symmetric, offsets = made[id(layer.weight)]
        rows, cols = layer.weight.shape
        if isinstance(layer, nn.Linear):
            sym, off = nn.Linear(cols, rows, bias=False, device="meta"), nn.Linear(cols // block, rows, bias=False, device="meta")
            off.bias = layer.bias
            part = OffsetLinear(sym, off, block)
        else:
            sym, off = nn.Embedding(rows, cols, device="meta"), nn.Embedding(rows, cols // block, device="meta")
            part = OffsetTable(sym, off, block)
        sym.weight, off.weight = symmetric, offsets
        parent, _, child = name.rpartition(".")
        holder = module.get_submodule(parent)
        split.originals.append((holder, child, layer))
        setattr(holder, child, part)
        split.symmetric[f"{name}.symmetric"], split.sources[f"{name}.symmetric"] = sym, (layer.weight, block)
        split.offsets[f"{name}.offsets"] = OFFSETS
    return split


def _packed(codes: np.ndarray) -> np.ndarray:
    """int4 as TFLite stores it: two's complement nibbles, two a byte, low nibble first."""
    nibbles = (codes.reshape(-1) & 15).astype(np.uint8)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def store_codes(model: bytes, ops: dict[str, list[str]],
                grids: Iterable[tuple[list[str], np.ndarray, np.ndarray]]) -> bytes:
    """`model` with each symmetric part's int4 codes and block scales (grids: (parts, codes,
    scales), one weight at a time) written over what ai_edge_quantizer stored in its ops (ops:
    layer -> scopes)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils.tfl_flatbuffer_utils import get_op_scope

    layer_of = {scope: name for name, scopes in ops.items() for scope in scopes}
    m = schema.ModelT.InitFromPackedBuf(model, 0)
    targets: dict[str, set[tuple[int, int, type]]] = {}  # layer -> (codes buffer, scales buffer, scale dtype)
    not_blocks = set()  # layers with an op not stored int4 blockwise: refused if on the grid
    for graph in m.subgraphs:
        for op in graph.operators:
            name = layer_of.get(get_op_scope(op, graph.tensors))
            if name is None:
                continue
            tensor = graph.tensors[op.inputs[1]]
            q = tensor.quantization
            if tensor.type != schema.TensorType.INT4 or q is None or not hasattr(q.details, "blockSize"):
                not_blocks.add(name)
                continue
            holder = graph.tensors[q.details.scales]
            dtype = np.float16 if holder.type == schema.TensorType.FLOAT16 else np.float32
            targets.setdefault(name, set()).add((tensor.buffer, holder.buffer, dtype))
    data = bytearray(model)
    root = schema.Model.GetRootAs(data, 0)

    def write(index: int, payload: np.ndarray, name: str) -> None:
        view = writable_buffer(root, data, index)
        if view.nbytes != payload.nbytes:
            raise BackendError("tflite", "store codes", f"{name}: buffer {index} holds {view.nbytes} bytes, the codes {payload.nbytes}")
        view[:] = payload.view(np.uint8).reshape(-1)

    for names, codes, scales in grids:
        packed = _packed(codes)
        for name in names:
            if name in not_blocks:
                raise BackendError("tflite", "store codes", f"{name}: ai_edge_quantizer did not store it as int4 blocks")
            if name not in targets:
                raise BackendError("tflite", "store codes", f"{name} holds no op of its own in the converted model",
                                   hint="export with --tflite-grid symmetric, or report the model")
            for codes_buffer, scales_buffer, dtype in targets[name]:
                stored = scales.astype(dtype)
                if not np.array_equal(stored.astype(np.float32), scales):
                    raise BackendError("tflite", "store codes", f"{name}: a block scale does not fit {np.dtype(dtype).name}")
                write(codes_buffer, packed, name)
                write(scales_buffer, stored, name)
    return bytes(data)
