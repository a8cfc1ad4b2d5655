"""`eupe vlm train` on the tiny config: both LLaVA stages on CPU, resume, bad records, formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from eupe.errors import ConfigError  # noqa: E402
from eupe.vlm import train as vlm_train  # noqa: E402
from eupe.vlm.data import REASONS, Collate  # noqa: E402
from eupe.vlm.model import EupeLlavaForConditionalGeneration, load_llava, square  # noqa: E402
from eupe.vlm.text import IGNORE, BadSample, byte_tokenizer, chat_prompt, check_turns, encode  # noqa: E402
from eupe.vlm.toy import write_toy_data  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "vlm" / "tiny.yaml"


def _config(out: Path, *overrides: str) -> vlm_train.VlmConfig:
    return vlm_train.load_vlm_config(TINY, [f"output_dir={out}", *overrides])


def _losses(metrics: Path, stage: str) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["loss"] for r in rows if r["stage"] == stage and "loss" in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vlm") / "run"
    summary = vlm_train.train_vlm(_config(out))
    return out, summary


def test_tiny_config_trains_both_stages_and_the_loss_falls(tiny_run):
    out, summary = tiny_run
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "final/config.json",
        "checkpoints/stage_a/final/config.json",
    ):
        assert (out / name).is_file(), name
    for stage in ("a", "b"):
        losses = _losses(out / "metrics.jsonl", stage)
        assert len(losses) >= 4 and all(map(torch.isfinite, torch.tensor(losses)))
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, (stage, losses)
        assert summary["stages"][stage]["skipped"] == dict.fromkeys(REASONS, 0)
    assert summary["final"] == str(out / "final")


def test_final_loads_with_from_pretrained_and_answers(tiny_run):
    out, _ = tiny_run
    from PIL import Image
    from transformers import AutoProcessor

    model, processor = load_llava(out / "final")
    assert isinstance(model, EupeLlavaForConditionalGeneration)
    image = square(Image.new("RGB", (64, 40), (220, 30, 30)))
    inputs = processor(text=chat_prompt("What colour is the shape?"), images=[image], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16  # (64 / 16)^2 patch tokens
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ids.shape[1] > inputs["input_ids"].shape[1]
    # transformers' from_pretrained on our class reads the same folder, tower included
    again = EupeLlavaForConditionalGeneration.from_pretrained(out / "final")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # every saved tensor is in the loaded model, the vision tower's under its module names
    from safetensors.torch import load_file

    state = model.state_dict()
    for key, value in load_file(out / "final" / "model.safetensors").items():
        assert torch.equal(state[key.replace("vision_tower.layer.", "vision_tower.model.layer.")], value), key
    assert AutoProcessor.from_pretrained(out / "final").tokenizer.convert_tokens_to_ids("<image>") == 4


def test_the_saved_chat_template_writes_the_evaluation_prompt(tiny_run):
    """apply_chat_template on final/ gives `chat_prompt` (issue 27: the template did not parse)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_run[0] / "final")
    question = "What colour is the shape?"
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert text == chat_prompt(question)
    turn = [{"role": "user", "content": question}]
    text = processor.tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert text == chat_prompt(question, image=False)


def test_finished_run_is_not_trained_again(tiny_run):
    out, _ = tiny_run
    before = (out / "final" / "model.safetensors").stat().st_mtime_ns
    summary = vlm_train.train_vlm(_config(out))
    assert summary["stages"]["b"]["resumed"] == "finished"
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="different config"):
        vlm_train.train_vlm(_config(out, "stage_b.lr=0.1"))


@pytest.mark.parametrize("grouped", [False, True])
def test_killed_stage_resumes_exactly(tmp_path, monkeypatch, grouped):
    from transformers import TrainerCallback

    args = ["stages=[a]", "stage_a.epochs=1", "stage_a.max_steps=6", "trainer.save_steps=2"]
    kill = 5  # after checkpoint-4, before checkpoint-6
    if grouped:  # LLaVA's grouped order, killed in the second epoch (6 steps each): that epoch's again
        args = [
            "stages=[a]",
            "stage_a.epochs=2",
            "trainer.save_steps=2",
            "stage_a.group_by_modality_length=true",
        ]
        kill = 9
    ref = vlm_train.train_vlm(_config(tmp_path / "ref", *args))

    class Kill(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == kill:
                raise KeyboardInterrupt

    make = vlm_train._callbacks
    monkeypatch.setattr(vlm_train, "_callbacks", lambda *a: [*make(*a), Kill()])
    with pytest.raises(KeyboardInterrupt):
        vlm_train.train_vlm(_config(tmp_path / "run", *args))
    monkeypatch.setattr(vlm_train, "_callbacks", make)
    assert (
        vlm_train.last_checkpoint(tmp_path / "run" / "checkpoints" / "stage_a").name
        == f"checkpoint-{kill - 1}"
    )
    vlm_train.train_vlm(_config(tmp_path / "run", *args))
    a = load_llava(Path(ref["final"]))[0].state_dict()
    b = load_llava(tmp_path / "run" / "final")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the log lines written after checkpoint-4 were dropped on resume


@pytest.mark.slow
def test_bad_records_are_skipped_and_counted_over_two_ranks(tmp_path):
    """torchrun, 2 CPU processes (gloo DDP): each rank skips its own bad records; the counts are summed."""
    paths = write_toy_data(tmp_path / "data", n=7)
    records = json.loads(Path(paths["stage_b"]).read_text())[:7]
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    records += [
        {"id": "m", "image": "images/none.png", "conversations": records[0]["conversations"]},
        {"id": "u", "image": "broken.png", "conversations": records[0]["conversations"]},
        {"id": "c1", "image": "images/0000.png", "conversations": [{"from": "gpt", "value": "x"}]},
        {"id": "c2", "image": "images/0000.png", "conversations": "hello"},
        ["not", "a", "record"],
    ]  # 12 records: 3 steps of 2 per rank, no padding by the distributed sampler
    data = tmp_path / "data" / "mixed.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    args = [f"output_dir={out}", "stages=[b]", "toy_data=false", f"stage_b.data={data}"]
    args += [f"stage_b.images={tmp_path / 'data'}", "stage_b.epochs=1", "stage_b.batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "eupe"]
    proc = subprocess.run([*cmd, "vlm", "train", str(TINY), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("final LLaVA model:") == 1  # rank 0 reports
    assert "stage b: train loss" in proc.stdout and "5 records skipped" in proc.stdout
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped"] == 5 and last["skipped_malformed_conversation"] == 3
    assert last["skipped_missing_image"] == 1 and last["skipped_unreadable_image"] == 1
    assert load_llava(out / "final")[0] is not None


def test_a_batch_of_only_bad_records_trains_on_a_placeholder(tmp_path):
    write_toy_data(tmp_path / "data", n=2)
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"image": "missing.png", "conversations": []}] * 8))
    summary = vlm_train.train_vlm(
        _config(
            tmp_path / "run",
            "stages=[a]",
            "toy_data=false",
            f"stage_a.data={data}",
            f"stage_a.images={tmp_path / 'data'}",
            "stage_a.epochs=1",
        )
    )
    assert summary["stages"]["a"]["skipped"]["malformed conversation"] == 8
    assert summary["stages"]["a"]["train_loss"] == 0.0


def test_collate_pads_and_places_a_placeholder():
    c = Collate(pad_id=3, image_token_id=4, image_tokens=2, image_size=8)
    good = {"input_ids": torch.tensor([1, 4, 4, 9]), "labels": torch.tensor([IGNORE, IGNORE, IGNORE, 9])}
    good["pixel_values"] = torch.ones(3, 8, 8)
    text = {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([IGNORE, 7])}
    b = c([good, text, {"skip": "too long"}])
    assert b["input_ids"].tolist() == [[1, 4, 4, 9], [1, 7, 3, 3]]
    assert b["labels"][1].tolist() == [IGNORE, 7, IGNORE, IGNORE]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["pixel_values"].shape == (1, 3, 8, 8) and b["skipped"].tolist() == [0, 0, 0, 1]
    p = c([{"skip": "missing image"}])
    assert p["input_ids"].tolist() == [[4, 4]] and (p["labels"] == IGNORE).all()  # no BOS assumed


def test_conversation_formats_supervise_only_the_answers():
    tok = byte_tokenizer()
    pairs = check_turns(
        {
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "Red"},
                {"from": "human", "value": "Shape?"},
                {"from": "gpt", "value": "circle"},
            ],
        },
        "vicuna_v1",
    )
    ids, labels = encode(tok, pairs, "vicuna_v1", image_tokens=3, image_token_id=4, max_length=1000)
    assert ids.count(4) == 3 and ids[0] == tok.bos_token_id
    supervised = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert supervised == " Red</s> circle</s>"  # the space after "ASSISTANT:" opens the answer
    assert tok.decode(ids[:1] + [i for i in ids[1:] if i != 4]).startswith("<s>A chat between")
    ids, labels = encode(tok, [("<image>\nDescribe.", "a red circle.")], "plain", 3, 4, 1000)
    assert ids[:4] == [tok.bos_token_id, 4, 4, 4]
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "a red circle.\n"
    with pytest.raises(BadSample, match="too long"):
        encode(tok, [("<image>\nDescribe.", "a red circle.")], "plain", 3, 4, max_length=3)
    for bad in (
        {
            "image": "x.png",
            "conversations": [{"from": "human", "value": "no image token"}, {"from": "gpt", "value": "a"}],
        },
        {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
    ):
        with pytest.raises(BadSample, match="malformed"):
            check_turns(bad, "vicuna_v1")


def test_bad_config_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="stages"):
        _config(tmp_path, "stages=[c]")
    with pytest.raises(ConfigError, match="style"):
        _config(tmp_path, "stage_b.style=chatml")
    with pytest.raises(ConfigError, match="not valid JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text("{oops")
        vlm_train.read_records(bad)


def test_a_frozen_language_model_can_load_in_bf16_and_the_projector_still_learns():
    from PIL import Image

    from eupe.vlm.model import build_llava

    lm = _config(Path("unused")).language_model  # the tiny config's 2-layer Llama
    model, processor = build_llava("eupe_vitt16", lm, tokenizer="byte", image_size=32, dtype=torch.bfloat16)
    assert model.model.language_model.dtype == torch.bfloat16
    assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.float32
    assert next(model.model.vision_tower.parameters()).dtype == torch.float32
    inputs = processor(
        text=chat_prompt("Colour?"), images=[square(Image.new("RGB", (40, 30)))], return_tensors="pt"
    )
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_a_folder_missing_weights_is_one_clear_error(tiny_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from eupe.errors import CheckpointError

    out, _ = tiny_run
    for drop in ("model.vision_tower.layer.0.norm1.weight", "model.multi_modal_projector.linear_1.weight"):
        broken = tmp_path / drop.split(".")[1]
        shutil.copytree(out / "final", broken)
        state = load_file(broken / "model.safetensors")
        del state[drop]
        save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match="vision tower|lack"):
            load_llava(broken)
    with pytest.raises(CheckpointError, match="not a LLaVA model folder"):
        load_llava(tmp_path)


def test_a_non_finite_loss_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    from eupe.cli import main

    compute = Trainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = compute(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 3 else loss

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    args = [f"output_dir={tmp_path / 'run'}", "stages=[a]", "stage_a.max_steps=6", "trainer.save_steps=2"]
    assert main(["vlm", "train", str(TINY), *args]) == 3
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("eupe vlm: error:")]
    assert len(lines) == 1 and "the loss is not finite at step 4" in lines[0] and "checkpoint-2" in lines[0]
    assert not (tmp_path / "run" / "final").exists()


def test_vision_feature_layer_takes_any_vit_block_and_only_the_last_of_a_convnext(tmp_path):
    """A ViT serves every block (before the final norm) and -1; a ConvNeXt -1 alone, else a ConfigError."""
    from eupe.models import create_model
    from eupe.models.hf import to_hf_model
    from eupe.vlm.model import build_llava

    lm = _config(Path("unused")).language_model
    vit, _ = build_llava("eupe_vitt16", lm, tokenizer="byte", image_size=32, vision_feature_layer=-2)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = vit.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        for layer in (*range(-13, -1), *range(13)):  # ViT-T: the embedding + 12 blocks
            got = torch.stack(vit.model.get_image_features(pixels, vision_feature_layer=layer).pooler_output)
            assert torch.equal(got, vit.model.multi_modal_projector(hidden[layer][:, 5:])), layer
        assert vit.model.get_image_features(pixels).pooler_output[0].shape == (4, 64)  # the config's -2
    for bad in (13, -14, 1.5):
        with pytest.raises(ConfigError, match="vision_feature_layer"):
            vit.model.get_image_features(pixels, vision_feature_layer=bad)
    folder = tmp_path / "convnext"  # a 4-stage ConvNeXt, 8 to 32 channels, as a transformers folder
    to_hf_model(
        create_model("eupe_convnext_tiny", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    ).save_pretrained(folder)
    conv, _ = build_llava(str(folder), lm, tokenizer="byte", image_size=64)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert conv.model.get_image_features(pixels).pooler_output[0].shape == (4, 64)  # (64 / 32)^2 tokens
    for bad in (-2, 0, 4):
        with pytest.raises(ConfigError, match="ConvNeXt"):
            conv.model.get_image_features(pixels, vision_feature_layer=bad)
        with pytest.raises(ConfigError, match="ConvNeXt"):
            build_llava(str(folder), lm, tokenizer="byte", image_size=64, vision_feature_layer=bad)
    conv.config.vision_feature_layer = -2  # as an edited config.json would load
    with pytest.raises(ConfigError, match="ConvNeXt"):
        EupeLlavaForConditionalGeneration(conv.config)


def test_init_with_another_vision_feature_layer_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    cfg = _config(tmp_path / "b", "stages=[b]", f"init={out / 'final'}", "vision_feature_layer=-2")
    with pytest.raises(ConfigError, match="vision_feature_layer -1"):
        vlm_train.train_vlm(cfg)
