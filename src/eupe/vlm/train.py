"""`eupe vlm train`: LLaVA-1.5's two training stages with an eupe encoder, on transformers' `Trainer`.

Stage A trains only the projector on image-caption pairs (LR 1e-3); stage B trains the projector
and the language model on the instruction mix (LR 2e-5). Both: one epoch, AdamW, cosine schedule,
warmup ratio 0.03, weight decay 0; the vision encoder stays frozen (paper 8.2).

Why the `Trainer`: it is what LLaVA itself trains with, and it brings what a 7B run needs without
code of ours: `torchrun`/`accelerate launch` data parallelism, FSDP (`trainer.fsdp`) or DeepSpeed
(`trainer.deepspeed`), bf16, gradient checkpointing, checkpoints holding optimizer, scheduler and
every rank's RNG state, and exact resume (the sampler order is seeded and the consumed batches
are skipped without being loaded).

A run folder holds `config.yaml`, `metrics.jsonl` (one line per log step, with the stage),
`checkpoints/stage_<s>/checkpoint-<step>/` (the Trainer's), `checkpoints/stage_a/final/` when
stage B follows, and `final/`: the last stage's model and processor, which
`EupeLlavaForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained` load.
Rerunning the same command resumes: finished stages are kept, an interrupted one continues from
its newest complete checkpoint (one whose `trainer_state.json`, written last, exists).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..errors import ConfigError, TrainingDiverged
from ..files import atomic_write, replace_dir
from ..runtime import rank
from .data import REASONS, Collate, ConversationData, read_records
from .model import TOWER, build_llava, load_llava
from .sampler import ModalityLengthSampler
from .text import IGNORE, STYLES


@dataclass
class StageConfig:
    data: str = ""  # LLaVA JSON (list) or JSON-lines file of conversations
    images: str = ""  # folder the records' "image" paths are relative to
    style: str = "plain"  # plain (stage A) | vicuna_v1 (stage B)
    train: list[str] = field(default_factory=lambda: ["projector"])  # + language_model
    lr: float = 1e-3
    epochs: float = 1.0
    batch_size: int = 32  # per device; global = batch_size x grad_accum x devices
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_steps: int = -1  # > 0: stop after this many optimizer steps (smoke runs)
    # LLaVA's group_by_modality_length: one modality per batch, similar lengths (eupe/vlm/sampler.py)
    group_by_modality_length: bool = False


@dataclass
class TrainerConfig:
    bf16: str = "auto"  # auto (bf16 where CUDA supports it) | true | false
    gradient_checkpointing: bool = False
    fsdp: str = ""  # e.g. "full_shard auto_wrap" (see transformers' TrainingArguments.fsdp)
    fsdp_config: dict[str, Any] = field(default_factory=dict)
    deepspeed: str | None = None  # a DeepSpeed JSON config, e.g. LLaVA's zero3.json
    num_workers: int = 4
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 42


@dataclass
class VlmConfig:
    output_dir: str = "runs/vlm"
    encoder: str = (
        "eupe_vitb16"  # zoo name, eupe folder or file, or a transformers folder (export --format hf)
    )
    encoder_weights: str | None = None
    image_size: int = 0  # 0: 336 for patch-14 encoders, else 384 (576 tokens for patch 14/16)
    # -1: the encoder's final, normed output; a ViT also takes a block's index (e.g. -2, the penultimate)
    vision_feature_layer: int = -1
    language_model: Any = "lmsys/vicuna-7b-v1.5"  # Hub name or folder; or a config mapping (random init)
    tokenizer: str | None = None  # default: the language model's; "byte": built here, no download
    # the language model's weights: auto = bfloat16 where it stays frozen (stage A) on a bf16 GPU, else
    # float32 (the optimizer's master weights; bf16 autocast computes in bf16 anyway)
    lm_dtype: str = "auto"  # auto | float32 | bfloat16
    max_length: int = 2048
    stages: list[str] = field(default_factory=lambda: ["a", "b"])
    init: str | None = None  # a LLaVA folder to start from, e.g. a stage-A final/ for `stages: [b]`
    toy_data: bool = False  # first write the generated shapes dataset to output_dir/data (tiny config)
    stage_a: StageConfig = field(default_factory=StageConfig)
    stage_b: StageConfig = field(
        default_factory=lambda: StageConfig(
            style="vicuna_v1",
            train=["projector", "language_model"],
            lr=2e-5,
            batch_size=16,
            group_by_modality_length=True,  # as LLaVA-1.5's finetune script; its pretraining does not
        )
    )
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    paths: dict[str, Any] = field(default_factory=dict)  # free-form, for ${paths.x} interpolation


def load_vlm_config(path: str | Path, overrides: list[str] | None = None) -> VlmConfig:
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(VlmConfig),
            OmegaConf.load(str(path)),
            OmegaConf.from_dotlist(overrides or []),
        )
        OmegaConf.resolve(cfg)
        config: VlmConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except (OmegaConfBaseException, OSError) as e:
        raise ConfigError(f"{path}: bad VLM config ({str(e).splitlines()[0]})") from None
    if not config.stages or any(s not in ("a", "b") for s in config.stages):
        raise ConfigError(f"{path}: stages must list a and/or b, got {config.stages}")
    for s in config.stages:
        st: StageConfig = getattr(config, f"stage_{s}")
        if not st.data or not st.images:
            raise ConfigError(f"{path}: stage_{s}.data and stage_{s}.images are required")
        if st.style not in STYLES:
            raise ConfigError(f"{path}: stage_{s}.style must be one of {', '.join(STYLES)}")
        unknown = set(st.train) - {"projector", "language_model"}
        if unknown or not st.train:
            raise ConfigError(
                f"{path}: stage_{s}.train lists projector and/or language_model, got {st.train}"
            )
    if config.lm_dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"{path}: lm_dtype is auto, float32 or bfloat16")
    if str(config.trainer.bf16).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"{path}: trainer.bf16 is auto, true or false")
    return config


class SkipCounts(TrainerCallback, ExportableState):
    """Records skipped so far, by reason, summed over ranks; saved in each checkpoint's trainer state."""

    def __init__(self, counts: list[int] | None = None):
        self.counts = list(counts or [0] * len(REASONS))

    def state(self) -> dict[str, Any]:
        return {"args": {"counts": self.counts}, "attributes": {}}


class MetricsFile(TrainerCallback):
    """Appends each log step of `stage` to `metrics.jsonl` (rank 0)."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"stage": self.stage, "step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _callbacks(metrics: Path, stage: str) -> list[Any]:
    return [SkipCounts(), MetricsFile(metrics, stage)]


class SamplerEpoch(TrainerCallback):
    """Gives the grouped sampler its epoch, from the trainer state, as each epoch begins.

    accelerate's `set_epoch` reaches the sampler of a fresh loader, but not under the wrappers of a
    resumed multi-rank one (skipped batches around sharded batches); the state holds it either way.
    """

    def __init__(self, sampler: ModalityLengthSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch or 0))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class LlavaTrainer(Trainer):
    """The Trainer, plus skipped-record counts, batches whose records were all skipped, a NaN stop,
    and optionally LLaVA's modality- and length-grouped sampler."""

    def __init__(self, *args: Any, sampler: ModalityLengthSampler | None = None, **kwargs: Any):
        self.grouped = sampler
        super().__init__(*args, **kwargs)
        if sampler is not None:
            self.add_callback(SamplerEpoch(sampler))

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        return self.grouped if self.grouped is not None else super()._get_train_sampler(*args, **kwargs)

    def _skips(self) -> SkipCounts:
        # looked up each time: resuming replaces the callback by one rebuilt from the checkpoint
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, SkipCounts))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped", None)
        if skipped is not None:
            skipped = skipped.to(self.args.device)
            if _distributed():
                torch.distributed.all_reduce(skipped)
            cb = self._skips()
            cb.counts = [a + int(b) for a, b in zip(cb.counts, skipped.tolist())]
        if not bool((inputs["labels"] != IGNORE).any()):  # the placeholder: a zero loss, same graph
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            out = model(**inputs)
            loss = out.logits.float().sum() * 0.0
            return (loss, out) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        if _distributed():
            torch.distributed.all_reduce(bad)  # every rank stops at the same step
        if bad.item():
            folder = Path(self.args.output_dir)
            done = last_checkpoint(folder) if folder.is_dir() else None
            where = f"rerun the command to resume from {done}" if done else "no checkpoint was written yet"
            for callback in self.callback_handler.callbacks:  # end the progress bar's line first, so
                bar = getattr(callback, "training_bar", None)  # the error is a line of its own
                if bar is not None:
                    bar.close()
            raise TrainingDiverged(
                f"the loss is not finite at step {self.state.global_step + 1} on {int(bad.item())} rank(s); "
                f"stopped before the optimizer step ({where}). Lower the learning rate or check the data."
            )
        return loss

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # the frozen vision tower is rebuilt as it was (same encoder, same seed or the same init
        # folder), not read back: the names transformers saves it under do not load (see model.py)
        def keep(keys: list[str]) -> list[str]:
            return [k for k in keys if not k.startswith(TOWER)]

        result = SimpleNamespace(
            missing_keys=keep(load_result.missing_keys), unexpected_keys=keep(load_result.unexpected_keys)
        )
        super()._issue_warnings_after_load(result)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        counts = self._skips().counts
        logs = {**logs, "skipped": sum(counts)}
        logs.update({f"skipped_{r.replace(' ', '_')}": n for r, n in zip(REASONS, counts) if n})
        super().log(logs, start_time)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete `checkpoint-<step>` (its trainer_state.json is written last)."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1])) if done else None


def _is_model_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file()  # a final/ folder appears whole (written aside, renamed)


def _truncate_metrics(metrics: Path, stage: str, step: int) -> None:
    """Drop log lines of `stage` after `step` (written after the checkpoint a run resumes from)."""
    if not metrics.is_file():
        return
    keep = []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if not (row.get("stage") == stage and row.get("step", 0) > step):
            keep.append(line)
    atomic_write(metrics, "".join(k + "\n" for k in keep))


def _is_main() -> bool:
    return rank() == 0


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _write_config(cfg: VlmConfig, out: Path) -> None:
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    path = out / "config.yaml"
    if path.is_file() and path.read_text() != text:
        raise ConfigError(
            f"{out} holds a run with a different config.yaml; resume with the same settings or use a new output_dir"
        )
    if _is_main() and not path.is_file():
        atomic_write(path, text)


def _prepare_toy_data(out: Path) -> None:
    from .toy import write_toy_data

    data = out / "data"
    if _is_main() and not (data / "stage_b.json").is_file():
        write_toy_data(data)
    while not (data / "stage_b.json").is_file():  # other ranks wait for rank 0's files
        time.sleep(0.2)


def _freeze(model: Any, train: list[str]) -> None:
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if "language_model" in train:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)


def _training_args(cfg: VlmConfig, st: StageConfig, folder: Path) -> Any:
    from transformers import TrainingArguments

    t = cfg.trainer
    cuda = torch.cuda.is_available()
    auto = str(t.bf16).lower() == "auto"
    bf16 = (cuda and torch.cuda.is_bf16_supported()) if auto else str(t.bf16).lower() == "true"
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5 folds warmup_ratio into warmup_steps (a float below 1 is a ratio) and renames
    # gradient_checkpointing to activation_checkpointing
    warmup = (
        {"warmup_ratio": st.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": st.warmup_ratio}
    )
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=st.batch_size,
        gradient_accumulation_steps=st.grad_accum,
        learning_rate=st.lr,
        weight_decay=st.weight_decay,
        num_train_epochs=st.epochs,
        max_steps=st.max_steps,
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        bf16=bf16,
        fsdp=t.fsdp,
        fsdp_config=t.fsdp_config or None,
        deepspeed=t.deepspeed,
        dataloader_num_workers=t.num_workers,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        seed=t.seed,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not cuda,
        **warmup,
        **{ckpt: t.gradient_checkpointing},
    )


def _lm_dtype(name: str, st: StageConfig) -> torch.dtype:
    if name == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 and "language_model" not in st.train else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _run_stage(cfg: VlmConfig, s: str, init: Path | None, final: Path, out: Path) -> dict[str, Any]:
    from transformers import set_seed

    st: StageConfig = getattr(cfg, f"stage_{s}")
    set_seed(cfg.trainer.seed)  # the same projector (and random towers of tiny configs) on every resume
    dtype = _lm_dtype(cfg.lm_dtype, st)
    if init is not None:
        model, processor = load_llava(init, dtype=dtype)
        if model.config.vision_feature_layer != cfg.vision_feature_layer:
            raise ConfigError(
                f"init {init} reads vision_feature_layer {model.config.vision_feature_layer}; "
                f"set vision_feature_layer={model.config.vision_feature_layer} to continue it"
            )
    else:
        model, processor = build_llava(
            cfg.encoder,
            cfg.language_model,
            encoder_weights=cfg.encoder_weights,
            tokenizer=cfg.tokenizer,
            image_size=cfg.image_size or None,
            dtype=dtype,
            vision_feature_layer=cfg.vision_feature_layer,
        )
    _freeze(model, st.train)
    tok = processor.tokenizer
    size = int(processor.image_processor.size["height"])
    tokens = int(model.config.image_seq_length)
    data = ConversationData(
        read_records(st.data),
        st.images,
        processor,
        st.style,
        tokens,
        model.config.image_token_id,
        cfg.max_length,
    )
    collate = Collate(tok.pad_token_id, model.config.image_token_id, tokens, size)
    folder = out / "checkpoints" / f"stage_{s}"
    metrics = out / "metrics.jsonl"
    resume = last_checkpoint(folder) if folder.is_dir() else None
    if resume is not None and _is_main():
        _truncate_metrics(metrics, s, int(resume.name.split("-")[-1]))
    args = _training_args(cfg, st, folder)
    sampler = None
    if st.group_by_modality_length:  # one megabatch: the records of one optimizer step, all ranks
        step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        sampler = ModalityLengthSampler(data.records, step, cfg.trainer.seed)
    trainer = LlavaTrainer(
        model=model,
        args=args,
        data_collator=collate,
        train_dataset=data,
        processing_class=processor,
        callbacks=_callbacks(metrics, s),
        sampler=sampler,
    )
    if resume is not None and _is_main():
        print(f"stage {s}: resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    tmp = final.with_name(final.name + ".tmp")
    trainer.save_model(str(tmp))  # every rank takes part (FSDP/DeepSpeed gather the weights)
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(tmp))
        replace_dir(tmp, final)
    _barrier()
    skipped = dict(zip(REASONS, trainer._skips().counts))
    return {"steps": result.global_step, "train_loss": result.training_loss, "skipped": skipped}


def train_vlm(cfg: VlmConfig) -> dict[str, Any]:
    """Run the configured stages; return {"final": path, "stages": {s: summary}}."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(cfg, out)
    if cfg.toy_data:
        _prepare_toy_data(out)
    summary: dict[str, Any] = {}
    init = Path(cfg.init) if cfg.init else None
    if init is not None and not _is_model_dir(init):
        raise ConfigError(f"init {init}: not a LLaVA folder (a stage-A final/ or a run's final/)")
    for k, s in enumerate(cfg.stages):
        last = k == len(cfg.stages) - 1
        final = out / "final" if last else out / "checkpoints" / f"stage_{s}" / "final"
        if _is_model_dir(final):
            if _is_main():
                print(f"stage {s}: already finished ({final})")
            summary[s] = {"final": str(final), "resumed": "finished"}
        else:
            summary[s] = {"final": str(final), **_run_stage(cfg, s, init, final, out)}
        init = final
    return {"final": str(out / "final"), "stages": summary}
