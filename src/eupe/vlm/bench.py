"""Score a LLaVA folder on the paper's six VLM benchmarks with lmms-eval (prompts and metrics are its).

`EupeLlava` is an lmms-eval model (`register_model("eupe_llava")`, a simple model): it loads a
folder with `load_llava`, builds each prompt with `chat_prompt` (Vicuna-v1, as in training) from
the task's question text, pads each image to a square (`square`) before the processor, and
decodes greedily, honouring the task's `max_new_tokens` (128 when a task sets none, LLaVA-1.5's
eval default) and `until` stop strings. `run_vlm_eval` hands it to `lmms_eval.simple_evaluate`.

The paper's number per task (`value` in results.json), read from lmms-eval's own aggregates:

    task           label      metric          lmms-eval metric
    textvqa_val    TextVQA    vqa_accuracy    exact_match (VQA accuracy, leave-one-out, a fraction)
    scienceqa_img  SQA        accuracy        exact_match
    realworldqa    Realworld  accuracy        exact_match
    pope           POPE       f1              pope_f1_score (pooled over its three splits)
    gqa            GQA        accuracy        exact_match
    mme            MMEp       mme_perception  mme_perception_score (sum over the 10 categories of
                                              acc + acc+, in points, at most 2000)

TextVQA OCR tokens: LLaVA-1.5's own eval appended "Reference OCR token: ..." to the question,
lmms-eval's default prompt does not (`ocr: false`). The default here is lmms-eval's, pinned
explicitly; `textvqa_ocr=True` switches it through the task's `lmms_eval_specific_kwargs`. The
choice is in every result's `settings`; numbers with and without it are not comparable.

Offline data (`data_dir`): each task reads `data_dir/<task>/` (a `DatasetDict` saved with
`save_to_disk`, see `bench_data`) by overriding its config with `dataset_path` and
`dataset_kwargs: {load_from_disk: true}`, lmms-eval's own offline route. GQA's `process_docs`
fetches its images from a second Hub config at run time; with `data_dir` it is replaced by a
join on `data_dir/gqa_images/` (that config saved to disk). No lmms-eval file is changed; the
one runtime patch (`filelock_compat`) lets lmms-eval 0.7.3 start with filelock 4.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tenacity import RetryError
from tqdm import tqdm

from ..errors import ConfigError
from ..eval.common import EvalResult
from ..files import atomic_write
from ..runtime import init_distributed, pick_device
from .bench_data import GQA_IMAGES
from .model import load_llava, reply

try:
    import datasets
    import lmms_eval
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
    from lmms_eval.evaluator import simple_evaluate  # also sets lmms-eval's loguru sink: WARNING
    from lmms_eval.utils import handle_non_serializable, load_yaml_config
except ImportError:
    raise ConfigError("VLM benchmarks need lmms-eval: pip install 'eupe[vlm]'") from None
from PIL import ImageFile  # noqa: E402

# lmms-eval turns on PIL's LOAD_TRUNCATED_IMAGES for the whole process when imported; eupe's data
# loaders count a truncated image as corrupt and skip it. It is on only while lmms-eval evaluates.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MODEL_NAME = "eupe_llava"
DEFAULT_MAX_NEW_TOKENS = 128  # LLaVA-1.5's eval scripts; used when a task sets no max_new_tokens


@dataclass(frozen=True)
class Bench:
    label: str  # the paper's column
    metric: str  # our name for the paper's number
    key: str  # the lmms-eval metric that is that number
    folder: str  # lmms-eval's task folder (lmms_eval/tasks/<folder>)


TASKS = {
    "textvqa_val": Bench("TextVQA", "vqa_accuracy", "exact_match", "textvqa"),
    "scienceqa_img": Bench("SQA", "accuracy", "exact_match", "scienceqa"),
    "realworldqa": Bench("Realworld", "accuracy", "exact_match", "realworldqa"),
    "pope": Bench("POPE", "f1", "pope_f1_score", "pope"),
    "gqa": Bench("GQA", "accuracy", "exact_match", "gqa"),
    "mme": Bench("MMEp", "mme_perception", "mme_perception_score", "mme"),
}


@register_model(MODEL_NAME)
class EupeLlava(lmms):
    """A LLaVA folder of `eupe vlm train` as an lmms-eval model (one request at a time)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # passed by simple_evaluate for string model names
        if kwargs:
            raise ConfigError(f"{MODEL_NAME}: unknown argument(s) {', '.join(kwargs)}")
        if int(batch_size) != 1:
            raise ConfigError(f"{MODEL_NAME} answers one request at a time; use batch_size 1")
        self._device = pick_device(device or "auto")  # cuda:<LOCAL_RANK> under torchrun
        # under torchrun lmms-eval splits the questions over the ranks and gathers the answers with
        # torch.distributed (its "torchrun" backend); NCCL between GPUs, gloo on CPUs
        init_distributed(self._device)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        self.pretrained = str(pretrained)
        self.model, self.processor = load_llava(pretrained, dtype=dtype)
        self.model.to(self._device)
        self.tokenizer = self.processor.tokenizer
        self.max_new_tokens = max_new_tokens  # a cap on every request (smoke tests); None: the task's

    @property
    def device(self) -> torch.device:
        return self._device

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers = []
        for request in tqdm(requests, desc=MODEL_NAME, disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = doc_to_visual(self.task_dict[task][split][doc_id])
            answer = self.answer(context, images, gen_kwargs)
            answers.append(answer)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answers

    def answer(self, question: str, images: list[Any], gen_kwargs: dict[str, Any] | None = None) -> str:
        """The model's reply to one question about `images` (PIL), cut at the first stop string."""
        kw = dict(gen_kwargs or {})
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if self.max_new_tokens:
            max_new = min(max_new, int(self.max_new_tokens))
        temperature = float(kw.get("temperature") or 0.0)  # no paper task samples; as lmms-eval's llava_hf
        return reply(
            self.model,
            self.processor,
            question,
            images,
            max_new_tokens=max_new,
            until=until,
            num_beams=int(kw.get("num_beams") or 1),
            temperature=temperature,
            top_p=kw.get("top_p"),
        )

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            f"{MODEL_NAME} only generates answers (generate_until); tasks scored by loglikelihood "
            "are not supported (none of the paper's six is)"
        )

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} answers single-turn questions only (generate_until)")


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(
            f"unknown VLM task(s) {', '.join(unknown) or '(none given)'}; supported: {', '.join(TASKS)}"
        )


def task_manager() -> Any:
    """lmms-eval's TaskManager indexing only the six tasks' folders (all 2000 take ~7 s to index)."""
    from lmms_eval.tasks import TaskManager

    root = Path(lmms_eval.__file__).parent / "tasks"
    folders = sorted({str(root / b.folder) for b in TASKS.values()})
    return TaskManager("WARNING", include_path=folders, include_defaults=False, model_name=MODEL_NAME)


def base_config(manager: Any, task: str) -> dict[str, Any]:
    """The task's yaml as lmms-eval loads it (includes resolved, `!function`s imported)."""
    return load_yaml_config(manager.task_index[task]["yaml_path"], mode="full")


def eval_split(config: dict[str, Any]) -> str:
    return config.get("test_split") or config.get("validation_split")


def check_data(data_dir: str | os.PathLike, task: str, split: str) -> Path:
    """`data_dir/<task>` as a saved DatasetDict holding `split`, or ConfigError naming the path."""
    folder = Path(data_dir) / task
    meta = folder / "dataset_dict.json"
    if not meta.is_file():
        raise ConfigError(
            f"{task}: no benchmark data at {folder} (expected a datasets folder from "
            f"DatasetDict.save_to_disk with split '{split}')"
        )
    splits = json.loads(meta.read_text()).get("splits", [])
    if split not in splits:
        raise ConfigError(f"{task}: {folder} has split(s) {', '.join(splits)}; lmms-eval reads '{split}'")
    return folder


def gqa_images_from(folder: Path, split: str) -> Any:
    """GQA's process_docs reading images from `folder` instead of the Hub.

    lmms-eval's `gqa_process_docs` calls `load_dataset("lmms-lab-encoder/GQA",
    "testdev_balanced_images")` and copies every image into the question rows. This does the same
    join on `imageId`, lazily (a transform looking images up by id), so nothing is re-encoded.
    """

    def process_docs(questions: Any) -> Any:
        images = datasets.load_from_disk(str(folder))[split]
        row = {image_id: i for i, image_id in enumerate(images["id"])}
        missing = sorted(set(questions["imageId"]) - row.keys())
        if missing:
            raise ConfigError(f"gqa: {len(missing)} imageId(s) not in {folder}, e.g. {missing[0]}")

        def attach(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            batch["image"] = [images[row[i]]["image"] for i in batch["imageId"]]
            return batch

        return questions.with_transform(attach)

    return process_docs


def task_entry(manager: Any, task: str, data_dir: Any, textvqa_ocr: bool) -> dict[str, Any]:
    """The task's config overrides for lmms-eval (merged over its yaml by the TaskManager)."""
    config = base_config(manager, task)
    entry: dict[str, Any] = {"task": task}
    if task == "textvqa_val":  # pin the OCR-token choice, keep lmms-eval's prompt otherwise
        kwargs = copy.deepcopy(config.get("lmms_eval_specific_kwargs") or {})
        kwargs.setdefault("default", {})["ocr"] = bool(textvqa_ocr)
        entry["lmms_eval_specific_kwargs"] = kwargs
    if data_dir is not None:
        split = eval_split(config)
        entry.update(
            dataset_path=str(check_data(data_dir, task, split)), dataset_kwargs={"load_from_disk": True}
        )
        if task == "gqa":
            entry["process_docs"] = gqa_images_from(check_data(data_dir, GQA_IMAGES, split), split)
    return entry


def metrics_of(raw: dict[str, Any]) -> dict[str, Any]:
    """lmms-eval's `{"metric,filter": value}` as `{"metric": value}` (filter kept unless "none")."""
    out = {}
    for key, value in raw.items():
        if key == "alias":
            continue
        name, _, filt = key.partition(",")
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[name if filt in ("", "none") else key] = value
    return out


def run_vlm_eval(
    model_dir: str | os.PathLike,
    tasks: list[str] | tuple[str, ...] | str,
    output_dir: str | os.PathLike,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    textvqa_ocr: bool = False,
    device: str = "auto",
    lm: Any = None,
    max_new_tokens: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Score `model_dir` on `tasks` with lmms-eval; write and return `{task: EvalResult dict}`.

    `lm`: an lmms-eval model to use instead of loading `model_dir` (then only its name); it serves
    one call, as lmms-eval's evaluator ends with `lm.clean()`, which drops its torch modules. Writes
    `output_dir/results.json`, `output_dir/samples/<task>.jsonl` (lmms-eval's per-sample logs) and
    TextVQA's submission file under `output_dir/submissions/`. `max_new_tokens` caps every answer's
    length (smoke tests); None keeps each task's own. `limit`: the first `limit` records per task.
    """
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    tasks = list(dict.fromkeys(tasks))  # lmms-eval refuses a task named twice
    check_tasks(tasks)
    if "mme" in tasks and limit is not None and limit % 2:
        raise ConfigError(f"mme scores its questions in pairs per image; use an even limit (got {limit})")
    manager = task_manager()
    entries = [task_entry(manager, t, data_dir, textvqa_ocr) for t in tasks]  # checks data_dir first
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lm is None:
        lm = EupeLlava(str(model_dir), device=device, max_new_tokens=max_new_tokens)
    results = evaluate(lm, entries, manager, limit, out)
    if results is None:  # under torchrun lmms-eval splits the questions over ranks; rank 0 reports
        return {}
    settings = {
        "textvqa_ocr": bool(textvqa_ocr),
        "prompt": "vicuna_v1",
        "image": "square pad (mean colour)",
        "limit": limit,
        "data_dir": None if data_dir is None else str(data_dir),
        "device": str(getattr(lm, "device", device)),
        "max_new_tokens": getattr(lm, "max_new_tokens", max_new_tokens),
        "lmms_eval": lmms_eval_version(),
    }
    (out / "samples").mkdir(exist_ok=True)
    payload = {}
    for task in tasks:
        payload[task] = task_result(task, results, str(model_dir), settings, local=data_dir is not None)
        samples = results.get("samples", {}).get(task, [])
        text = "".join(json.dumps(s, default=handle_non_serializable) + "\n" for s in samples)
        (out / "samples" / f"{task}.jsonl").write_text(text)
    atomic_write(out / "results.json", json.dumps(payload, indent=1, default=handle_non_serializable) + "\n")
    return payload


def evaluate(
    lm: Any, entries: list[dict[str, Any]], manager: Any, limit: int | None, out: Path
) -> dict | None:
    """lmms-eval's `simple_evaluate` on the task entries, with per-sample logs (None off rank 0)."""
    filelock_compat()
    # what lmms-eval reads from its CLI namespace; TextVQA writes its submission under output_path
    cli = argparse.Namespace(output_path=str(out), process_with_media=True, reasoning_tags=None)
    caller = ImageFile.LOAD_TRUNCATED_IMAGES  # restored after, whatever the caller had set
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as lmms-eval runs its benchmarks
    try:
        return simple_evaluate(
            model=lm,
            tasks=entries,
            limit=limit,
            task_manager=manager,
            log_samples=True,
            verbosity="WARNING",
            distributed_executor_backend="torchrun",
            cli_args=cli,
        )
    except RetryError as e:  # loading a task's data failed (lmms-eval retries it 5 times)
        cause = e.last_attempt.exception()
        if isinstance(cause, ConfigError):
            raise cause from None
        reason = (str(cause).splitlines() or [""])[0]
        raise ConfigError(
            f"benchmark data could not be loaded ({type(cause).__name__}: {reason}); from the Hub, "
            "lmms-eval's task configs need a token (hf auth login); offline, pass data_dir"
        ) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = caller


def task_result(task: str, results: dict, model: str, settings: dict, local: bool) -> dict[str, Any]:
    """The EvalResult dict of `task` from lmms-eval's results: the paper's number plus all raw metrics."""
    bench, config = TASKS[task], results["configs"].get(task, {})
    metrics = metrics_of(results["results"].get(task, {}))
    value = metrics.get(bench.key)
    counts = results.get("n-samples", {}).get(task, {})
    dataset = config.get("dataset_path", "")
    if not local and config.get("dataset_name"):
        dataset = f"{dataset}:{config['dataset_name']}"
    extra = {
        "label": bench.label,
        "samples": counts.get("effective"),
        "samples_total": counts.get("original"),
        "lmms_eval_metric": bench.key,
        "lmms_eval": metrics,
        "generation_kwargs": config.get("generation_kwargs"),
    }
    status = "ok" if value is not None else f"lmms-eval returned no {bench.key}"
    value = None if value is None else float(value)
    return EvalResult(task, bench.metric, value, model, dataset, dict(settings), extra, status).to_dict()


def filelock_compat() -> None:
    """Let lmms-eval 0.7.3 run with filelock 4 (a runtime patch of lmms-eval, nothing on disk).

    `simple_evaluate` first patches filelock 3's internals (`filelock._api`, gone in filelock 4)
    and fails with ModuleNotFoundError where that module is missing. Its patch makes locks
    re-entrant for nested `load_dataset` calls; none of the six tasks nests them (GQA's second
    download starts after the first has finished) and `load_from_disk` takes no locks, so where
    `filelock._api` is missing we mark the patch as applied and lmms-eval skips it.
    """
    import importlib.util

    from lmms_eval import evaluator

    if importlib.util.find_spec("filelock._api") is None:
        evaluator._enable_reentrant_filelocks._patched = True  # lmms-eval's own "done" flag


def lmms_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmms_eval")
    except PackageNotFoundError:
        return "unknown"
