"""The printed table of `eupe plan`: every number with the formula behind it."""

from __future__ import annotations

from typing import Any

from .estimate import CATEGORIES, GIB


def format_flops(x: float) -> str:
    """FLOPs in engineering units."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} FLOP"


def format_plan(p: dict[str, Any]) -> str:
    """The human-readable table, with the formula behind every number."""
    hw, par, sp, fl = p["hardware"], p["parallelism"], p["spec"], p["flops"]
    st = next(c for k, c in p["models"].items() if k.startswith("student"))
    lines = [
        f"eupe plan {p['config']}: {hw['gpus']} x {hw['gpu']} ({hw['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 "
        f"dense peak, {hw['memory_bytes'] / GIB:.1f} GiB), MFU {hw['mfu']}",
        f"  global batch {sp['global_batch']}, {sp['max_steps']:,} steps, micro-batch {par['micro_batch']}/GPU x "
        f"accum {par['accum_steps']}; {par['chosen']} (chosen)",
        "",
        "networks (measured on the meta device, FLOPs = 2 per multiply-add, counted by "
        f"{st['flops_method']}):",
    ]
    for key, c in p["models"].items():
        role = "student" if key.startswith("student") else "teacher"
        if key == "student":
            net = sp["student"]
        elif role == "student":
            net = sp["students"][key.split(" ", 1)[1]]
        else:
            net = sp["teachers"][key]
        res = "/".join(str(r) for r in net["resolutions"])
        toks = "/".join(str((r // c["stride"]) ** 2 + c["prefix_tokens"]) for r in net["resolutions"])
        flops = "/".join(format_flops(c["fwd_flops"][r]) for r in net["resolutions"])
        lines.append(
            f"  {role:<8}{key.split(' ', 1)[1] if role == 'student' and ' ' in key else '' if role == 'student' else key:<16}{net['model']:<36}{c['params'] / 1e6:>9,.1f}M  @{res:<12} tokens "
            f"{toks:<14} fwd {flops}/img"
        )
        if net.get("note"):
            lines.append(f"          note: {net['note']}")
    lines += ["", "FLOPs per image (E_r = mean over the resolutions a network draws, uniform):"]
    for k, v in fl["per_image"].items():
        lines.append(f"  {k:<52}{format_flops(v):>16}")
    if fl["per_image_recompute"]:
        lines.append(
            f"  {'checkpoint recompute (1x student forward)':<52}{format_flops(fl['per_image_recompute']):>16}"
        )
    lines += [
        f"  {'total per image':<52}{format_flops(fl['per_image_model'] + fl['per_image_recompute']):>16}",
        f"  per step = {sp['global_batch']} x per image = {format_flops(fl['per_step'])};  "
        f"total = x {sp['max_steps']:,} steps = {format_flops(fl['total'])} ({fl['total']:.3e})",
        f"  formula: {fl['formula']}",
        "",
        f"memory per GPU (GiB; micro-batch {par['micro_batch']}, n = {hw['gpus']} with FSDP):",
    ]
    variants = p["memory"]["variants"]
    lines.append(f"  {'':<18}" + "".join(f"{v + (' *' if v == par['chosen'] else ''):>14}" for v in variants))
    for row in (*CATEGORIES, "total"):
        lines.append(f"  {row:<18}" + "".join(f"{m[row] / GIB:>14,.1f}" for m in variants.values()))
    cap = hw["memory_bytes"] / GIB
    lines.append(
        f"  {'fits ' + format(cap, '.1f') + ' GiB?':<18}"
        + "".join(f"{'yes' if m['total'] <= hw['memory_bytes'] else 'NO':>14}" for m in variants.values())
    )
    lines.append(
        f"  {'max micro-batch':<18}" + "".join(f"{m['max_micro_batch']:>14,}" for m in variants.values())
    )
    chosen = variants[par["chosen"]]
    if chosen["total"] > hw["memory_bytes"]:
        fits = [v for v, m in variants.items() if m["total"] <= hw["memory_bytes"]]
        lines.append(
            f"  ! {par['chosen']} needs {chosen['total'] / GIB:.0f} GiB > {cap:.1f} GiB: use --micro-batch "
            f"{chosen['max_micro_batch']} (more accumulation)" + (f" or {', '.join(fits)}" if fits else "")
        )
    lines += [f"  formula: {p['memory']['formula']}", ""]
    t, im = p["time"], p["images"]
    lines.append(
        f"wall-clock: {format_flops(fl['total'])} / ({hw['gpus']} x {hw['peak_bf16_flops'] / 1e12:.0f} TFLOP/s x {hw['mfu']}) = "
        f"{t['days']:.2f} days ({t['gpu_hours']:,.0f} GPU-hours)"
    )
    seen = (
        f"images seen: {sp['global_batch']} x {sp['max_steps']:,} = {im['seen']:,} ({im['seen'] / 1e9:.2f}B)"
    )
    if im["epochs"]:
        seen += f" = {im['epochs']:.2f} passes over {im['dataset_size']:,} images"
    lines.append(seen)
    return "\n".join(lines)
