"""Measure a network's training cost without weights: FLOPs on the meta device, saved activations on
fake tensors.

`eupe plan` needs per-image numbers for 1-2B parameter teachers and proxies on a laptop. Building a
model under ``torch.device("meta")`` allocates nothing and `FlopCounterMode` runs on meta tensors;
activations are measured on the same modules turned into fake CPU tensors (`FakeTensorMode`), where
bf16 autocast runs as in training. The counts are those of the real modules (timm's attention,
RoPE, ConvNeXt blocks), not a hand-written model of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from ...errors import ConfigError

BF16 = 2  # bytes per element: teacher weights and FSDP gather buffers are bf16


@dataclass
class ModelCost:
    """What `eupe plan` knows about one network, per image, at each resolution it was sized at.

    fwd_flops[r]: forward FLOPs of one r x r image (2 per multiply-add; matmul, conv and attention
        as counted by torch.utils.flop_counter; elementwise ops are not counted).
    act_bytes[r]: bytes autograd saves for backward per image, trained as the trainer trains it
        (bf16 autocast over fp32 parameters, or bf16 parameters over 1B; flash attention, which keeps
        q, k, v, out and the log-sum-exp, not the N x N scores).
    act_ckpt_bytes[r]: the same with every block checkpointed: block inputs stay alive, one block's
        activations are rebuilt at a time.
    flops_method: "FlopCounterMode(meta)" or "analytic: 2*params*tokens + 4*L*T^2*D" (the fallback).
    """

    name: str
    params: int
    embed_dim: int
    cls_dim: int
    stride: int
    prefix_tokens: int
    num_blocks: int
    max_block_params: int
    mlp_dim: int
    fwd_flops: dict[int, float] = field(default_factory=dict)
    act_bytes: dict[int, float] = field(default_factory=dict)
    act_ckpt_bytes: dict[int, float] = field(default_factory=dict)
    flops_method: str = "FlopCounterMode(meta)"

    def patch_tokens(self, res: int) -> int:
        return (res // self.stride) ** 2

    def tokens(self, res: int) -> int:
        """Sequence length through the blocks: (res / patch)^2 + prefix (cls + registers)."""
        return self.patch_tokens(res) + self.prefix_tokens


# --- building networks on the meta device ---------------------------------------------------------
def build_meta(backend: str, model: str, kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, nn.Module]:
    """(module to run, timm backbone) for a zoo/eupe encoder or a timm model, with no memory."""
    kwargs = dict(kwargs or {})
    if backend == "timm":
        import timm

        # The teacher backend resizes inputs to the configured resolution, which need not be the
        # name's default (a pyramid draws several): let timm interpolate position embeddings.
        if "img_size" not in kwargs:
            kwargs.setdefault("dynamic_img_size", True)
        with torch.device("meta"):
            try:
                net = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
            except TypeError:  # an architecture without dynamic_img_size
                kwargs.pop("dynamic_img_size", None)
                net = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
        return net, net
    if backend == "eupe":
        from ...models import ZOO, create_model

        if model in ZOO or os.path.isfile(os.path.join(model, "config.json")):
            enc = create_model(model, device="meta", **kwargs)
            return enc, enc.backbone
        raise ConfigError(
            f"cannot size eupe teacher/student '{model}': it is neither a zoo name ({', '.join(ZOO)}) "
            "nor a folder with config.json; name its architecture with --arch NAME=ZOO_NAME"
        )
    raise ConfigError(f"cannot size backend '{backend}' on the meta device; plan supports 'timm' and 'eupe'")


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """Innermost modules whose class name ends in 'Block' (timm EvaBlock, Block, ConvNeXtBlock):
    the units that activation checkpointing and FSDP wrap one at a time."""
    found = [m for m in backbone.modules() if type(m).__name__.endswith("Block")]
    return [
        m for m in found if not any(o is not m and type(o).__name__.endswith("Block") for o in m.modules())
    ]


def describe(name: str, backend: str, model: str, kwargs: dict[str, Any] | None = None) -> ModelCost:
    net, backbone = build_meta(backend, model, kwargs)
    blocks = _blocks(backbone)
    linears = [m.out_features for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]
    dim = int(getattr(backbone, "num_features", 0) or getattr(net, "embed_dim", 0))
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    stride = int(patch[0]) if patch else int(getattr(net, "stride", 32))
    cost = ModelCost(
        name=name,
        params=sum(p.numel() for p in net.parameters()),
        embed_dim=dim,
        cls_dim=dim,
        stride=stride,
        prefix_tokens=int(getattr(backbone, "num_prefix_tokens", 0)),
        num_blocks=len(blocks),
        max_block_params=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        mlp_dim=max(linears, default=4 * dim),
    )
    cost._net = net  # type: ignore[attr-defined]  # kept for the measurements below
    cost._blocks = blocks  # type: ignore[attr-defined]
    return cost


def _run(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = net(x)
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in (getattr(out, "cls", None), getattr(out, "patches", None)) if t is not None]


# --- FLOPs ----------------------------------------------------------------------------------------
def analytic_forward_flops(cost: ModelCost, res: int) -> float:
    """Fallback: 2 * params * tokens (every weight used once per token) + 4 * L * T^2 * D (QK^T, AV)."""
    t = cost.tokens(res)
    return 2.0 * cost.params * t + 4.0 * cost.num_blocks * t * t * cost.embed_dim


def measure_forward_flops(cost: ModelCost, res: int) -> float:
    """Forward FLOPs for one res x res image, counted on the meta device."""
    net = cost._net  # type: ignore[attr-defined]
    x = torch.empty(1, 3, res, res, device="meta", dtype=next(net.parameters()).dtype)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            outs = _run(net, x)
        if outs:  # pooled/summary width (PE's pooled output, the student's cls)
            cost.cls_dim = int(outs[0].shape[-1])
        return float(counter.get_total_flops())
    except Exception as counted_error:
        try:  # does the model run at all at this size? if not, that is the user's error to see
            with torch.no_grad():
                _run(net, x)
        except Exception as e:
            raise ConfigError(f"{cost.name}: cannot run at {res}x{res} ({type(e).__name__}: {e})") from None
        # it runs, but not under the counter (an op without a meta FLOP rule): use the formula, say so
        cost.flops_method = f"analytic: 2*params*tokens + 4*L*T^2*D ({type(counted_error).__name__})"
        return analytic_forward_flops(cost, res)


# --- activations ----------------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_autocast_norms() -> Iterator[None]:
    """Under CPU autocast, run LayerNorm/GroupNorm in fp32 as CUDA autocast does (its fp32 list; CPU
    autocast keeps the input's dtype): a bf16 input then gives an fp32 output, and backward saves
    what it saves on the GPU. Patched into `torch.nn.functional` for the block, not a mode, so that
    activation checkpointing's recompute in backward sees it too."""
    originals = {name: getattr(F, name) for name in ("layer_norm", "group_norm")}

    def fp32_under_autocast(fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            if torch.is_autocast_enabled("cpu"):
                args, kwargs = tree_map(_fp32, (args, kwargs))
            return fn(*args, **kwargs)

        return run

    for name, fn in originals.items():
        setattr(F, name, fp32_under_autocast(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


def _fp32(x: Any) -> Any:
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x


def _as_trained(cost: ModelCost, dtype: torch.dtype | None = None) -> FakeTensorMode:
    """Materialise the meta-built network as fake CPU tensors in the dtype the trainer trains it in:
    fp32 parameters (DDP students), or bf16 ones for a network over 1B parameters (the proxy, which
    runs under FSDP2 with a bf16 mixed-precision policy)."""
    net: nn.Module = cost._net  # type: ignore[attr-defined]
    dtype = dtype or (torch.bfloat16 if cost.params > 1e9 else torch.float32)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        net._apply(
            lambda t: torch.empty_like(t, device="cpu", dtype=dtype if t.is_floating_point() else t.dtype)
        )
    return mode


def _saved_bytes(cost: ModelCost, batch: int, res: int) -> tuple[float, float]:
    """(bytes saved for backward, the same with per-block checkpointing) for one training forward on
    fake tensors: bf16 autocast with CUDA's fp32 norms, the CPU flash-attention kernel (it saves q, k,
    v, the output and the log-sum-exp, as flash attention on a GPU does; no N x N scores)."""
    net: nn.Module = cost._net  # type: ignore[attr-defined]
    blocks: list[nn.Module] = cost._blocks  # type: ignore[attr-defined]
    params = {p.untyped_storage() for p in net.parameters()}
    seen: set = set()  # storages already counted (views and repeated saves count once)
    total = [0.0]
    per_block: list[tuple[float, float]] = []  # (saved inside the block, block input bytes)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage not in params and storage not in seen:
            seen.add(storage)
            total[0] += storage.nbytes()
        return t

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        per_block.append((-total[0], x.numel() * x.element_size() if x is not None else 0.0))

    def post(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        start, inp = per_block[-1]
        per_block[-1] = (total[0] + start, inp)

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    mode: FakeTensorMode = cost._mode  # type: ignore[attr-defined]
    try:
        with mode, cuda_autocast_norms(), torch.autocast("cpu", dtype=torch.bfloat16):
            with saved_tensors_hooks(pack, lambda t: t):
                outs = _run(net.train(), torch.empty(batch, 3, res, res))
    finally:
        for h in handles:
            h.remove()
    del outs
    inside = sum(s for s, _ in per_block)
    ckpt = total[0] - inside + sum(i for _, i in per_block) + max((s for s, _ in per_block), default=0.0)
    return total[0], ckpt


def measure_activations(cost: ModelCost, res: int) -> tuple[float, float]:
    """Per-image (full, checkpointed) activation bytes: the difference of a batch of 2 and of 1,
    so per-step constants (bf16 weight casts, RoPE tables) drop out."""
    one, one_ckpt = _saved_bytes(cost, 1, res)
    two, two_ckpt = _saved_bytes(cost, 2, res)
    return two - one, two_ckpt - one_ckpt


def size_model(
    name: str,
    backend: str,
    model: str,
    resolutions: list[int],
    kwargs: dict[str, Any] | None = None,
    trainable: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ModelCost:
    """Describe a network and measure its per-image FLOPs (and activations if trainable) at each res."""
    cost = describe(name, backend, model, kwargs)
    for res in sorted(set(resolutions)):
        if res % cost.stride:
            raise ConfigError(
                f"{name} ({model}) needs resolutions that are multiples of its patch size {cost.stride}; "
                f"got {res} (nearest: {max(cost.stride, round(res / cost.stride) * cost.stride)})"
            )
        if progress:
            progress(f"{name} @{res}")
        cost.fwd_flops[res] = measure_forward_flops(cost, res)
    if trainable:
        cost._mode = _as_trained(cost)  # type: ignore[attr-defined]
        for res in sorted(set(resolutions)):
            cost.act_bytes[res], cost.act_ckpt_bytes[res] = measure_activations(cost, res)
        del cost._mode  # type: ignore[attr-defined]
    del cost._net, cost._blocks  # type: ignore[attr-defined]
    return cost
