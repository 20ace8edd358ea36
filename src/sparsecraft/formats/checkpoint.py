"""Save and load a whole model with compressed linear layers (safetensors + config).

A compressed checkpoint directory holds
- ``config.json``: the model's transformers config plus ``compression_config``, a summary that
  uses compressed-tensors' field names (format, targets, ignore, sparsity_structure, num_bits,
  group_size, symmetric) so other tools can tell what it holds, and the sha256 of the weights file;
- ``model.compressed.safetensors``: for each compressed layer ``<layer>.weight.<field>`` (fields
  of :mod:`.bitmask` / :mod:`.nm` / :mod:`.dense`), every other tensor under its usual name; the
  per-layer manifest (format, shape, dtype, N:M, quantization) sits in the file's metadata;
- tokenizer and generation config files.

There is deliberately no ``model.safetensors``: plain transformers refuses the directory instead
of silently building a model with random weights. ``decompress`` writes a plain HF directory.
Every write goes to a temporary directory that is renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SparsecraftError
from ..models.discovery import Conv1D, is_linear, prunable_linears, weight_matrix
from .bitmask import BitmaskTensor
from .dense import QuantizedDenseTensor
from .meta import DTYPES, dtype_name
from .nm import NMTensor, check_nm
from .qinfo import QuantizedWeight, codes_from_dense
from .registry import FORMATS, CompressedTensor, tensor_from_stored

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.compressed.safetensors"
CONFIG_KEY = "compression_config"
LAYOUT = "sparsecraft/1"
FORMAT_CHOICES = ("bitmask", "nm", "dense", "auto")


@dataclass
class CompressConfig:
    """How to store the model's linear layers.

    ``format``: ``bitmask``, ``nm`` (packed N:M, refuses a non-N:M mask or in % M != 0), ``dense``
    (quantized codes without a mask; quantized layers only) or ``auto`` (the smallest of those that
    apply, per layer). ``targets``/``ignore`` are regexes on model-relative layer names; by default
    every linear inside the decoder blocks. ``dtype`` casts float weights (e.g. to float16) first.
    """

    format: str = "bitmask"
    n: int = 2
    m: int = 4
    targets: list[str] | None = None
    ignore: list[str] | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMAT_CHOICES:
            raise SparsecraftError(f"format {self.format!r}: choose one of {', '.join(FORMAT_CHOICES)}")
        if not (1 <= self.n < self.m <= 16):
            raise SparsecraftError(f"N:M = {self.n}:{self.m}: need 1 <= N < M <= 16 (e.g. 2:4)")
        if self.dtype is not None and self.dtype not in DTYPES.values():
            raise SparsecraftError(f"dtype {self.dtype}: choose float16, bfloat16 or float32")
        for pattern in (self.targets or []) + (self.ignore or []):
            try:
                re.compile(pattern)
            except re.error as e:
                raise SparsecraftError(
                    f"targets/ignore pattern {pattern!r} is not a valid regex ({e})"
                ) from None


# ------------------------------------------------------------------------------------------ encode
def compress_weight(
    w: torch.Tensor,
    fmt: str,
    n: int = 2,
    m: int = 4,
    qw: QuantizedWeight | None = None,
    where: str = "weight",
) -> CompressedTensor | None:
    """Encode one (out, in) weight; ``None`` means "keep it a plain dense tensor" (auto only)."""
    if qw is not None:
        # the model must hold exactly what the quantizer produced, or the codes would lie
        if not torch.equal(qw.dequantize().to(device=w.device, dtype=w.dtype), w):
            raise SparsecraftError(
                f"{where}: the layer's weight differs from its quantized codes (was it changed after "
                "quantization?); quantize again"
            )
    if fmt == "auto":
        candidates = []
        for f in ("bitmask", "nm", "dense"):
            if f == "nm" and not _is_nm(qw.mask if qw is not None else w != 0, n, m):
                continue
            if f == "dense" and qw is None:
                continue
            candidates.append(compress_weight(w, f, n, m, qw, where))
        best = min(candidates, key=lambda t: t.nbytes())
        if qw is None and best.nbytes() >= w.numel() * w.element_size():
            return None
        return best
    if fmt == "bitmask":
        if qw is None:
            return BitmaskTensor.from_dense(w, where=where)
        return BitmaskTensor.from_codes(qw.codes, qw.mask, qw.info, w.dtype, where)
    if fmt == "nm":
        if qw is None:
            return NMTensor.from_dense(w, n, m, where=where)
        return NMTensor.from_codes(qw.codes, qw.mask, qw.info, w.dtype, n, m, where)
    if fmt == "dense":
        if qw is None:
            raise SparsecraftError(
                f"{where}: the 'dense' compressed format stores quantized codes; this layer is not "
                "quantized (use bitmask or nm, or save a plain HF directory)"
            )
        return QuantizedDenseTensor.from_codes(qw.codes, qw.info, w.dtype, where)
    raise SparsecraftError(f"format {fmt!r}: choose one of {', '.join(FORMAT_CHOICES)}")


def _is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    out_f, in_f = keep.shape
    return in_f % m == 0 and bool((keep.view(out_f, in_f // m, m).sum(-1) <= n).all())


def _layer_names(model: nn.Module, cfg: CompressConfig) -> list[str]:
    return list(prunable_linears(model, cfg.targets, cfg.ignore))


def compress_model(
    model: nn.Module, cfg: CompressConfig, quantized: dict[str, QuantizedWeight] | None = None
) -> dict[str, CompressedTensor]:
    """Encode every targeted linear layer of ``model`` (model-relative names -> tensors)."""
    quantized = quantized or {}
    modules = dict(model.named_modules())
    names = _layer_names(model, cfg)
    unknown = sorted(set(quantized) - set(names))
    if unknown:
        raise SparsecraftError(
            f"quantized layers {unknown[:3]} are not among the targeted layers; widen targets"
        )
    out: dict[str, CompressedTensor] = {}
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(x, **_):
            return x

    for name in tqdm(names, desc="compress", disable=len(names) < 20):
        w = weight_matrix(modules[name]).detach().cpu()
        if cfg.dtype is not None and name not in quantized:
            w = w.to(cfg.dtype)
        if cfg.format == "nm" and name not in quantized:
            check_nm(cfg.n, cfg.m, w.shape[1], name)
        t = compress_weight(w, cfg.format, cfg.n, cfg.m, quantized.get(name), where=name)
        if t is not None:
            out[name] = t
    return out


# -------------------------------------------------------------------------------------------- save
def _atomic_dir(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _commit_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise SparsecraftError(f"{out}: exists and is not a directory")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _summary(layers: dict[str, CompressedTensor], cfg: CompressConfig, all_linears: list[str]) -> dict:
    """compressed-tensors style description (field names shared; the byte layout is ours)."""
    names = sorted(layers)
    ignore = sorted(set(all_linears) - set(layers))
    formats = sorted({t.FORMAT for t in layers.values()})
    nm = sorted({f"{t.n}:{t.m}" for t in layers.values() if isinstance(t, NMTensor)})
    kept = total = 0
    for t in layers.values():
        if not isinstance(t, QuantizedDenseTensor):
            mask = t.dense_mask() if isinstance(t, BitmaskTensor) else None
            kept += int(mask.sum()) if mask is not None else t.shape[0] * t.row_len
            total += t.shape[0] * t.shape[1]
    summary: dict = {
        "layout": LAYOUT,
        "format": formats[0] if len(formats) == 1 else "mixed",
        "sparsity_config": {
            "format": "nm" if formats == ["nm"] else ("bitmask" if "bitmask" in formats else "dense"),
            "targets": [t for t in names if not isinstance(layers[t], QuantizedDenseTensor)],
            "ignore": ignore,
            "sparsity_structure": nm[0] if len(nm) == 1 and formats == ["nm"] else "unstructured",
            "global_sparsity": round(1 - kept / total, 6) if total else 0.0,
        },
    }
    quants = {json.dumps(t.quant.meta(), sort_keys=True) for t in layers.values() if t.quant is not None}
    if quants:
        groups = {}
        for i, q in enumerate(sorted(quants)):
            qm = json.loads(q)
            targets = [n for n in names if layers[n].quant is not None and layers[n].quant.meta() == qm]
            groups[f"group_{i}"] = {
                "targets": targets,
                "weights": {**qm, "type": "int", "strategy": "group"},
                "input_activations": None,
            }
        summary["quantization_config"] = {
            "format": "int-quantized"
            if all(json.loads(q)["num_bits"] == 8 for q in quants)
            else "pack-quantized",
            "config_groups": groups,
            "ignore": sorted(set(all_linears) - {n for n in names if layers[n].quant is not None}),
        }
    return summary


def save_compressed(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    cfg: CompressConfig | None = None,
    quantized: dict[str, QuantizedWeight] | None = None,
    layers: dict[str, CompressedTensor] | None = None,
    extra_files: dict[str, object] | None = None,
) -> Path:
    """Write ``model`` with its targeted linears compressed (``layers`` if already encoded).

    ``extra_files`` maps file names to JSON-serialisable objects written beside the weights.
    """
    from safetensors.torch import save_file

    cfg = cfg or CompressConfig()
    if layers is None:
        layers = compress_model(model, cfg, quantized)
    modules = dict(model.named_modules())
    weight_keys = {f"{name}.weight": name for name in layers}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        if key in weight_keys:
            continue
        ident = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride()) if value.numel() else None
        if ident is not None and ident in seen:  # tied weights (lm_head = embeddings)
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        if cfg.dtype is not None and value.is_floating_point():
            value = value.to(cfg.dtype)
        tensors[key] = value.detach().cpu().contiguous()
    manifest_layers = {}
    for name, t in layers.items():
        meta = t.meta()
        meta["layer_type"] = "conv1d" if Conv1D and isinstance(modules[name], Conv1D) else "linear"
        manifest_layers[name] = meta
        for fld, value in t.to_tensors().items():
            tensors[f"{name}.weight.{fld}"] = value.contiguous()
    dtypes = {str(p.dtype) for p in model.parameters() if p.is_floating_point()}
    model_dtype = cfg.dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    manifest = {
        "layout": LAYOUT,
        "layers": manifest_layers,
        "aliases": aliases,
        "dtype": dtype_name(model_dtype),
    }
    if len(dtypes) > 1:
        log.info("model has mixed parameter dtypes %s; each tensor keeps its own", sorted(dtypes))

    out = Path(out_dir)
    tmp = _atomic_dir(out)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"sparsecraft": json.dumps(manifest)})
        config = model.config.to_dict()
        config.pop(CONFIG_KEY, None)
        config.pop("quantization_config", None)
        config["dtype"] = dtype_name(model_dtype)
        summary = _summary(layers, cfg, [n for n, mod in modules.items() if is_linear(mod)])
        summary["sparsecraft"] = {"weights_file": WEIGHTS_FILE, "sha256": _sha256(tmp / WEIGHTS_FILE)}
        config[CONFIG_KEY] = summary
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for fname, obj in (extra_files or {}).items():
            (tmp / fname).write_text(json.dumps(obj, indent=2, default=str))
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -------------------------------------------------------------------------------------------- load
def is_compressed_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    try:
        return CONFIG_KEY in json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise SparsecraftError(f"{path}: no config.json; not a compressed checkpoint directory") from None
    except json.JSONDecodeError as e:
        raise SparsecraftError(f"{path}/config.json: not valid JSON ({e}); the file is corrupt") from None
    if CONFIG_KEY not in config:
        raise SparsecraftError(
            f"{path}: config.json has no '{CONFIG_KEY}'; this is a plain model directory (load it with "
            "sparsecraft.models.load, or compress it with `sparsecraft compress`)"
        )
    return config


def load_tensors(path: str | os.PathLike, verify: bool = True):
    """Read a compressed checkpoint: (compressed layers, other tensors, manifest, config dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = _read_config(path)
    info = config[CONFIG_KEY].get("sparsecraft", {})
    file = path / info.get("weights_file", WEIGHTS_FILE)
    if not file.is_file():
        raise SparsecraftError(f"{path}: weights file {file.name} is missing")
    if verify and info.get("sha256") and _sha256(file) != info["sha256"]:
        raise SparsecraftError(
            f"{file}: checksum mismatch with config.json — the file is corrupt or truncated; re-create it"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(file))
        manifest = json.loads(metadata["sparsecraft"])
        layer_meta = manifest["layers"]
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise SparsecraftError(
            f"{file}: not a readable compressed checkpoint, corrupt or truncated ({e})"
        ) from None
    if manifest.get("layout") != LAYOUT:
        raise SparsecraftError(f"{file}: layout {manifest.get('layout')!r} is not {LAYOUT!r}")
    layers: dict[str, CompressedTensor] = {}
    for name, meta in layer_meta.items():
        prefix = f"{name}.weight."
        fields = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if meta.get("format") not in FORMATS:
            raise SparsecraftError(f"{name}: unknown format {meta.get('format')!r} in {file}")
        layers[name] = tensor_from_stored(fields, meta, where=name)
        for k in fields:
            del tensors[prefix + k]
    return layers, tensors, manifest, config


def quantized_from_layers(layers: dict[str, CompressedTensor]) -> dict[str, QuantizedWeight]:
    """The quantized layers of a loaded checkpoint as quantizer outputs (to re-encode them in
    another format without touching a single value)."""
    out = {}
    for name, t in layers.items():
        if t.quant is None:
            continue
        dense = t.to_dense()
        out[name] = QuantizedWeight(codes_from_dense(dense, t.quant, name), t.quant, dense != 0)
    return out


class CompressedLinear(nn.Module):
    """A linear layer whose weight stays compressed; a reference forward that decompresses.

    The runtime's SparseLinear replaces this with kernels; this one defines the semantics:
    ``y = x @ W.T + b`` with W (out, in) also for a GPT-2 Conv1D.
    """

    def __init__(self, weight: CompressedTensor, bias: torch.Tensor | None, layer_type: str = "linear"):
        super().__init__()
        self.weight_compressed = weight
        self.layer_type = layer_type
        self.out_features, self.in_features = weight.shape
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_compressed.to_dense().to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        t = self.weight_compressed
        q = f", int{t.quant.bits} g{t.quant.group_size}" if t.quant is not None else ""
        return f"{self.in_features}->{self.out_features}, {t.FORMAT}{q}"


def _build_model(path: Path, config: dict, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    cfg = dict(config)
    cfg.pop(CONFIG_KEY, None)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise SparsecraftError(f"{path}/config.json: no model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def load_compressed(
    path: str | os.PathLike, dense: bool = True, verify: bool = True
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)``: with ``dense`` every layer decompressed into a plain HF model,
    otherwise the compressed layers become :class:`CompressedLinear` modules."""
    path = Path(path)
    layers, tensors, manifest, config = load_tensors(path, verify)
    dtype = DTYPES.get(manifest.get("dtype"), torch.float32)
    model = _build_model(path, config, dtype)
    modules = dict(model.named_modules())
    state = dict(tensors)
    for name, t in layers.items():
        if name not in modules or not is_linear(modules[name]):
            raise SparsecraftError(f"{path}: compressed layer {name} is not a linear layer of this model")
        if tuple(weight_matrix(modules[name]).shape) != t.shape:
            raise SparsecraftError(
                f"{path}: {name} has shape {t.shape}, the model expects "
                f"{tuple(weight_matrix(modules[name]).shape)}"
            )
        if dense:
            w = t.to_dense()
            is_conv = manifest["layers"][name].get("layer_type") == "conv1d"
            state[f"{name}.weight"] = w.t().contiguous() if is_conv else w
    for key, src in manifest.get("aliases", {}).items():
        if src not in state:
            raise SparsecraftError(f"{path}: tied tensor {key} refers to missing {src}")
        state[key] = state[src]
    expected = set(model.state_dict())
    if not dense:
        expected -= {f"{name}.weight" for name in layers}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise SparsecraftError(
            f"{path}: weights do not match the model config (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]})"
        )
    model.load_state_dict(state, strict=False)
    if not dense:
        for name, t in layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            bias = state.get(f"{name}.bias")
            layer_type = manifest["layers"][name].get("layer_type", "linear")
            setattr(parent, child, CompressedLinear(t, bias if bias is not None else old.bias, layer_type))
    tokenizer = _load_tokenizer(path)
    return model.eval(), tokenizer


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        log.warning("%s: tokenizer not loaded (%s)", path, e)
        return None


def decompress(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Compressed checkpoint -> plain Hugging Face directory (loads in plain transformers)."""
    from ..models import save

    model, tokenizer = load_compressed(path, dense=True)
    return save(model, tokenizer, out_dir)


# ----------------------------------------------------------------------------------------- inspect
@dataclass
class _Row:
    shape: tuple[int, int]
    dtype: str
    format: str
    nbytes: int
    dense_bytes: int
    sparsity: float | None
    quant: dict | None = None
    extra: dict = field(default_factory=dict)


def describe(source) -> dict:
    """Bytes on disk versus dense and bits per weight, per compressed layer and in total.

    ``source`` is a compressed checkpoint directory, a plain HF directory (its prunable linears
    are reported as stored dense, with their sparsity) or an ``nn.Module``.
    """
    if isinstance(source, nn.Module):
        return _describe_model(source, "<model>", None)
    path = Path(source)
    if not path.is_dir():
        raise SparsecraftError(
            f"{source}: not a directory; describe() takes a checkpoint directory or a model"
        )
    if not is_compressed_dir(path):
        from ..models import load

        model, _ = load(str(path))
        disk = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
        return _describe_model(model, str(path), disk)
    layers, tensors, manifest, _ = load_tensors(path, verify=False)
    rows = {}
    for name, t in layers.items():
        esize = torch.empty((), dtype=t.dtype).element_size()
        sparsity = None
        if isinstance(t, BitmaskTensor):
            sparsity = 1 - t.nnz / (t.shape[0] * t.shape[1])
        elif isinstance(t, NMTensor):
            sparsity = 1 - t.n / t.m
        rows[name] = _Row(
            t.shape,
            dtype_name(t.dtype),
            t.FORMAT,
            t.nbytes(),
            t.shape[0] * t.shape[1] * esize,
            sparsity,
            t.quant.meta() if t.quant is not None else None,
        )
    other = sum(v.numel() * v.element_size() for v in tensors.values())
    disk = (path / WEIGHTS_FILE).stat().st_size
    return _report(str(path), rows, other, disk)


def _describe_model(model: nn.Module, label: str, disk: int | None) -> dict:
    rows = {}
    names = prunable_linears(model)
    for name, layer in names.items():
        w = weight_matrix(layer)
        nbytes = w.numel() * w.element_size()
        rows[name] = _Row(
            tuple(w.shape), dtype_name(w.dtype), "plain", nbytes, nbytes, float((w == 0).float().mean())
        )
    counted = {weight_matrix(layer).data_ptr() for layer in names.values()}
    seen: set[int] = set()
    other = 0
    for t in model.state_dict().values():
        ptr = t.data_ptr()
        if ptr in counted or ptr in seen:
            continue
        seen.add(ptr)
        other += t.numel() * t.element_size()
    return _report(label, rows, other, disk)


def _report(label: str, rows: dict[str, _Row], other_bytes: int, disk: int | None) -> dict:
    weights = sum(r.shape[0] * r.shape[1] for r in rows.values())
    layer_bytes = sum(r.nbytes for r in rows.values())
    dense_bytes = sum(r.dense_bytes for r in rows.values())
    return {
        "source": label,
        "bytes_on_disk": disk,
        "dense_bytes": dense_bytes + other_bytes,
        "other_tensor_bytes": other_bytes,
        "layers": {
            name: {
                "format": r.format,
                "shape": list(r.shape),
                "dtype": r.dtype,
                "sparsity": r.sparsity,
                "quant": r.quant,
                "bytes": r.nbytes,
                "dense_bytes": r.dense_bytes,
                "bits_per_weight": 8 * r.nbytes / (r.shape[0] * r.shape[1]),
            }
            for name, r in rows.items()
        },
        "total": {
            "layers": len(rows),
            "weights": weights,
            "bytes": layer_bytes,
            "dense_bytes": dense_bytes,
            "bits_per_weight": 8 * layer_bytes / weights if weights else None,
            "dense_bits_per_weight": 8 * dense_bytes / weights if weights else None,
        },
    }
