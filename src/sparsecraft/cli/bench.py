"""`sparsecraft bench MODEL --device cpu --batch 1 --prompt-len 64 --new-tokens 128`.

Decode speed of a (pruned) model run densely by torch and through the sparse runtime in each
requested format, in one process: tokens/s (medians of interleaved runs), resident memory and
weight bytes of each variant, and per-layer time inside a real decode against the bandwidth bound
(bytes / STREAM-like read bandwidth measured in the same run).

Formats are ``LAYOUT[-VALUES][+head8]``: LAYOUT ``bitmask`` or ``nm`` (2:4 unless ``--nm N:M``),
VALUES ``fp32`` (default), ``bf16``, ``fp16``, ``int8``, ``int4``; ``+head8`` also stores the
lm_head as int8 (dense). Devices are registered in ``DEVICE_RUNNERS``; ``cpu`` lives here, an
accelerator adds its own runner (same arguments, same result rows).
"""

from __future__ import annotations

import gc
import logging
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..errors import SparsecraftError
from .common import write_json

log = logging.getLogger(__name__)

VALUE_KINDS = {
    "fp32": {},
    "bf16": {"dtype": torch.bfloat16},
    "fp16": {"dtype": torch.float16},
    "int8": {"bits": 8},
    "int4": {"bits": 4},
}
DEFAULT_FORMATS = ["bitmask", "bitmask-int8", "bitmask-int8+head8"]
_SPEC = re.compile(r"^(bitmask|nm)(?:-(fp32|bf16|fp16|int8|int4))?(\+head8)?$")


@dataclass(frozen=True)
class FormatSpec:
    text: str
    layout: str
    values: str
    head8: bool

    def convert_kwargs(self, n: int, m: int, group_size: int) -> dict:
        kw = {"format": self.layout, "lm_head_int8": self.head8, "group_size": group_size, "n": n, "m": m}
        kw.update(VALUE_KINDS[self.values])
        return kw


def parse_format(text: str) -> FormatSpec:
    m = _SPEC.match(text.strip())
    if not m:
        raise SparsecraftError(
            f"--formats {text!r}: use LAYOUT[-VALUES][+head8] with LAYOUT bitmask|nm and VALUES "
            "fp32|bf16|fp16|int8|int4, e.g. bitmask, nm-int8, bitmask-int8+head8"
        )
    return FormatSpec(text.strip(), m.group(1), m.group(2) or "fp32", bool(m.group(3)))


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise SparsecraftError(f"--nm {text!r}: expected N:M such as 2:4") from None
    if not 1 <= n < m <= 16:
        raise SparsecraftError(f"--nm {text!r}: need 1 <= N < M <= 16")
    return n, m


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="decode speed, memory and per-layer kernel time: dense vs sparse formats"
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="HF directory, .gguf, smollm2-135m, random:NAME, or a compressed checkpoint directory",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (the Triton kernels)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    p.add_argument(
        "--formats",
        nargs="+",
        default=DEFAULT_FORMATS,
        metavar="FORMAT",
        help=f"sparse variants, LAYOUT[-VALUES][+head8] (default: {' '.join(DEFAULT_FORMATS)})",
    )
    p.add_argument("--nm", default="2:4", help="N:M pattern for the nm layout (default 2:4)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (32, 64, 128)")
    p.add_argument(
        "--magnitude",
        default=None,
        metavar="SPARSITY|N:M",
        help="prune the model by weight magnitude first (e.g. 0.7 or 2:4); default: use it as given",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median reported)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense torch baseline")
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="one product per layer (default: q/k/v and gate/up stacked, on a GPU for the dense model too)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="cuda: decode steps through torch.compile before the CUDA graph (dense and sparse alike)",
    )
    p.add_argument("--json", dest="json_path", help="write the results as JSON")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------- model setup
def _load(source: str):
    from ..formats.checkpoint import is_compressed_dir, load_compressed
    from ..models import load

    if is_compressed_dir(source):
        return load_compressed(source, dense=True)
    return load(source)


def _magnitude(model, spec: str | None) -> None:
    if spec is None:
        return
    from ..models.discovery import prunable_linears, set_weight_matrix, weight_matrix
    from ..prune.masks import layer_mask, nm_mask

    if ":" in spec:
        n, m = parse_nm(spec)
        pick = lambda s: nm_mask(s, n, m)  # noqa: E731
    else:
        try:
            sparsity = float(spec)
        except ValueError:
            raise SparsecraftError(f"--magnitude {spec!r}: give a sparsity in [0, 1) or N:M") from None
        if not 0.0 <= sparsity < 1.0:
            raise SparsecraftError(f"--magnitude {spec}: sparsity must be in [0, 1)")
        pick = lambda s: layer_mask(s, sparsity)  # noqa: E731
    with torch.no_grad():
        for layer in prunable_linears(model).values():
            w = weight_matrix(layer)
            set_weight_matrix(layer, w * pick(w.abs().float()))


def _layer_kind(name: str) -> str:
    """model.layers.7.self_attn.q_proj -> self_attn.q_proj (one row per kind of layer)."""
    return re.sub(r"^.*?\.\d+\.", "", name)


# ------------------------------------------------------------------------------------- cpu runner
def run_cpu(args, specs: list[FormatSpec]) -> dict:
    from ..kernels.cpu import stream_bandwidth
    from ..runtime import convert, decode_speed, layer_timer, rss_bytes, weight_bytes
    from ..runtime.measure import layer_bytes

    if args.threads is not None:
        if args.threads < 1:
            raise SparsecraftError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    n, m = parse_nm(args.nm)
    models, memory = {}, {}
    tokenizer = None

    def build(name, fn):
        gc.collect()
        before = rss_bytes()
        model = fn()
        gc.collect()
        memory[name] = {
            "resident_mb": round((rss_bytes() - before) / 2**20, 1),
            **{
                k: round(v / 1e6, 2)
                for k, v in {
                    "weight_mb": weight_bytes(model)["weight_bytes"],
                    "linear_weight_mb": weight_bytes(model)["linear_bytes"],
                }.items()
            },
        }
        models[name] = model

    def base():
        nonlocal tokenizer
        model, tokenizer = _load(args.model)
        _magnitude(model, args.magnitude)
        return model.eval()

    if not args.no_dense:
        build("dense (torch)", base)
    for spec in specs:
        kw = spec.convert_kwargs(n, m, args.group_size) | {"fuse": not args.no_fuse}
        build(spec.text, lambda kw=kw: convert(base(), **kw))
    vocab = int(getattr(next(iter(models.values())).config, "vocab_size", 32000))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(
        min(100, vocab - 1), max(vocab - 1, 101), (args.batch, args.prompt_len), generator=gen
    )
    prompt = prompt.clamp_(0, vocab - 1)
    bw = stream_bandwidth(threads=threads)
    speed = decode_speed(models, prompt, args.new_tokens, repeats=args.repeats)
    base_name = "dense (torch)" if "dense (torch)" in speed else None

    # per-layer time inside a real decode (batch rows == args.batch), against bytes / bandwidth
    layers = {}
    for name, model in models.items():
        mods = dict(model.named_modules())
        with layer_timer(model) as times:
            from ..runtime.measure import _generate

            _generate(model, prompt, min(args.new_tokens, 16))
        per_kind = defaultdict(lambda: {"calls": 0, "us": [], "bytes": 0})
        for lname, ts in times.items():
            decode = ts[1:]  # the first call of each layer is the prefill
            if not decode:
                continue
            k = per_kind[_layer_kind(lname)]
            k["us"].append(statistics.median(decode) * 1e6)
            k["bytes"] += layer_bytes(mods[lname])
            k["calls"] += 1
        rows = {}
        for kind, k in per_kind.items():
            bytes_per = k["bytes"] / k["calls"]
            bound_us = bytes_per / (bw["read_gbs"] * 1e9) * 1e6
            us = statistics.median(k["us"])
            rows[kind] = {
                "layers": k["calls"],
                "kb": round(bytes_per / 1e3, 1),
                "us": round(us, 1),
                "bound_us": round(bound_us, 1),
                "of_bound": round(bound_us / us, 2) if us else None,
            }
        layers[name] = rows

    variants = {}
    for name in models:
        row = {**speed[name], **memory[name]}
        if base_name:
            row["speedup_vs_dense"] = round(speed[name]["tokens_per_s"] / speed[base_name]["tokens_per_s"], 3)
        row["layers"] = layers[name]
        variants[name] = row
    return {
        "model": args.model,
        "device": "cpu",
        "threads": threads,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "magnitude": args.magnitude,
        "stream_read_gbs": round(bw["read_gbs"], 1),
        "stream_copy_gbs": round(bw["copy_gbs"], 1),
        "variants": variants,
    }


def run_cuda(args, specs: list[FormatSpec]) -> dict:  # the GPU runner lives with the Triton kernels
    from ..kernels.triton.bench import run_cuda as runner

    return runner(args, specs)


DEVICE_RUNNERS = {"cpu": run_cpu, "cuda": run_cuda}


def _print(res: dict) -> None:
    print(
        f"{res['model']} on {res['device']}, {res['threads']} threads, batch {res['batch']}, prompt "
        f"{res['prompt_len']}, {res['new_tokens']} new tokens; STREAM read {res['stream_read_gbs']} GB/s, "
        f"copy {res['stream_copy_gbs']} GB/s"
    )
    hdr = (
        f"{'variant':28s} {'tok/s':>8s} {'x dense':>8s} {'ms/tok':>8s} {'linear MB':>10s} "
        f"{'weights MB':>11s} {'RSS MB':>8s}"
    )
    print(hdr)
    for name, r in res["variants"].items():
        print(
            f"{name:28s} {r['tokens_per_s']:8.2f} {r.get('speedup_vs_dense', float('nan')):8.2f} "
            f"{r['ms_per_token']:8.2f} {r['linear_weight_mb']:10.1f} {r['weight_mb']:11.1f} "
            f"{r['resident_mb']:8.1f}"
        )
    if any("graph_tokens_per_s" in r for r in res["variants"].values()):
        print("static cache, one CUDA graph per decode step (runtime.static_greedy"
              + (", torch.compile" if res.get("compiled") else "") + "):")
        for name, r in res["variants"].items():
            print(
                f"  {name:26s} {r['graph_tokens_per_s']:8.2f} tok/s "
                f"{r.get('graph_speedup_vs_dense', float('nan')):6.2f}x {r['graph_ms_per_step']:8.3f} ms/step"
                f"  tokens equal generate's: {r['graph_tokens_equal_generate']}"
            )
    if not any(r["layers"] for r in res["variants"].values()):
        return  # timed per layer only where the CPU kernels run
    print("per-layer decode time (median us per call) vs bandwidth bound (bytes / STREAM read):")
    for name, rows in ((n, r["layers"]) for n, r in res["variants"].items()):
        cells = ", ".join(f"{k} {v['us']:.0f}/{v['bound_us']:.0f}us" for k, v in rows.items())
        print(f"  {name}: {cells}")


def run(args) -> int:
    if args.device.split(":")[0] not in DEVICE_RUNNERS:
        raise SparsecraftError(f"--device {args.device}: supported here: {', '.join(DEVICE_RUNNERS)}")
    for name, v in (("--batch", args.batch), ("--prompt-len", args.prompt_len), ("--repeats", args.repeats)):
        if v < 1:
            raise SparsecraftError(f"{name} {v}: must be >= 1")
    if args.new_tokens < 2:
        raise SparsecraftError(f"--new-tokens {args.new_tokens}: need at least 2 to time decoding")
    specs = [parse_format(f) for f in args.formats]
    res = DEVICE_RUNNERS[args.device.split(":")[0]](args, specs)
    _print(res)
    if args.json_path:
        write_json(args.json_path, res)
    return 0
