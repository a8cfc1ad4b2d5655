"""`eupe vlm bench` end to end on a generated easy-VQA folder and a tiny Llama (no download), and the
pieces it is made of: the data conversion, the baselines, the answer check, the resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from eupe.cli import main  # noqa: E402
from eupe.errors import ConfigError  # noqa: E402
from eupe.models import create_model  # noqa: E402
from eupe.vlm import easy_vqa as ev  # noqa: E402
from eupe.vlm.vqa_bench import normalize  # noqa: E402
from tests.vlm_tokenizers import bpe_tokenizer  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (40, 70, 220), "green": (30, 180, 60)}


def fake_easy_vqa(root: Path, n_images: int = 6) -> Path:
    """easy-VQA's file layout (answers.txt, <split>/questions.json, <split>/images/<id>.png)."""
    rng = random.Random(0)
    root.mkdir(parents=True)
    (root / "answers.txt").write_text("\n".join([*COLOURS, "circle", "rectangle", "triangle", "yes", "no"]))
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        rows = []
        for i in range(n_images):
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(["circle", "rectangle"])
            im = Image.new("RGB", (64, 64), (255, 255, 255))
            draw = ImageDraw.Draw(im)
            (draw.ellipse if shape == "circle" else draw.rectangle)((12, 12, 52, 52), fill=COLOURS[colour])
            im.save(root / split / "images" / f"{i}.png")
            rows += [
                [f"what color is the {shape}?", colour, i],
                ["what shape is in the image?", shape, i],
                [f"is there a {shape}?", "yes", i],
                ["is there a triangle?", "no", i],
            ]
        (root / split / "questions.json").write_text(json.dumps(rows))
    return root


def tiny_language_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_easy_vqa_rows_records_and_baselines(tmp_path):
    root = fake_easy_vqa(tmp_path / "data")
    train, test = ev.read_split(root, "train"), ev.read_split(root, "test")
    assert len(train) == 24 and {r["kind"] for r in train} == {"yes/no", "shape", "color"}
    assert train[0]["image"] == "train/images/0.png" and (root / train[0]["image"]).is_file()
    record = ev.to_llava(train[:1])[0]
    human, gpt = record["conversations"]
    assert human["value"] == f"<image>\n{train[0]['question']}\n{ev.INSTRUCTION}"
    assert gpt["value"] == train[0]["answer"]
    assert ev.subset(train, 5, 0) == ev.subset(train, 5, 0) != ev.subset(train, 5, 1)
    assert len(ev.subset(train, 0, 0)) == 24
    # a quarter of the questions answer "yes", a quarter "no": the most frequent answer gets 1/4
    assert ev.majority_baseline(train, test) == pytest.approx(0.25)
    assert ev.majority_baseline(train, test, by_kind=True)["yes/no"] == pytest.approx(0.5)
    assert ev.encoder_key("demo-output/seed_0/stage3/final") == "seed_0_stage3"
    assert ev.encoder_key("pixels") == "pixels"
    with pytest.raises(ConfigError, match="not an easy-VQA data folder"):
        ev.easy_vqa_root(tmp_path)


def test_the_question_only_baseline_answers_each_wording_as_training_did():
    def row(q, a):
        return {"question": q, "answer": a, "kind": ev.kind(a)}

    train = [row("is there a red shape?", "no")] * 2 + [row("is there a red shape?", "yes")]
    train += [row("what shape is it?", "circle")] * 3 + [row("what color is the circle?", "red")]
    train += [row("is there not a red shape?", "yes")]
    test = [
        row("is there a red shape?", "no"),  # the wording's majority: hit
        row("is there a red shape?", "yes"),  # miss
        row("what shape is it?", "triangle"),  # miss
        row("what color is the circle?", "red"),  # hit
        row("which shape is shown?", "circle"),  # a wording training never asked: the overall majority, hit
    ]
    blind = ev.question_only_baseline(train, test)
    assert blind["accuracy"] == pytest.approx(3 / 5)
    assert blind["by_kind"] == pytest.approx({"yes/no": 0.5, "shape": 0.5, "color": 1.0})
    assert ev.accuracy(["no", "no", "no", "no", "no"], test)["accuracy"] == pytest.approx(1 / 5)


def test_the_pixel_baseline_hands_on_the_raw_patches(tmp_path):
    folder = ev.build_baseline("pixels", tmp_path)
    model = create_model(str(folder)).eval()
    x = torch.randn(1, 3, 32, 32)  # an input as the encoder takes it (already normalized)
    with torch.no_grad():
        patches = model(x).patches[0]  # [4, 768], after the final LayerNorm
    raw = x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(4, 768)
    expected = torch.nn.functional.layer_norm(raw, (768,), eps=model.backbone.norm.eps)
    assert torch.allclose(patches, expected, atol=1e-4)
    with pytest.raises(ConfigError, match="unknown baseline"):
        ev.build_baseline("nope", tmp_path)


def test_answers_match_after_case_space_and_full_stop():
    assert normalize(" Red.") == "red" and normalize("yes") == "yes" and normalize("no!") == "no"
    assert normalize("a red circle") != "red"


def test_the_training_seed_changes_the_vlm_run_but_not_the_questions(tmp_path, monkeypatch):
    from eupe.cli import build_parser
    from eupe.vlm import vqa_bench

    args = build_parser().parse_args(["vlm", "bench", "--encoders", "pixels", "--output-dir", "x"])
    assert args.train_seed == 0
    seen = {}
    monkeypatch.setattr(vqa_bench, "run_bench", lambda *a, settings, **k: seen.setdefault("s", settings))
    monkeypatch.setattr(vqa_bench, "format_table", lambda results: "")
    argv = ["vlm", "bench", "--quick", "--train-seed", "3", "--encoders", "pixels", "--output-dir", "x"]
    assert main(argv) == 0
    s = seen["s"]
    assert (s.train_seed, s.seed, s.steps_b) == (3, 0, vqa_bench.BenchSettings.quick().steps_b)
    cfg = vqa_bench.train_config(
        "pixels", tmp_path / "run", tmp_path / "lm", tmp_path / "d.json", tmp_path, s
    )
    assert cfg.trainer.seed == 3


def test_bench_trains_scores_and_resumes(tmp_path, capsys):
    root = fake_easy_vqa(tmp_path / "data")
    lm = tiny_language_model(tmp_path / "lm")
    out = tmp_path / "bench"
    argv = ["vlm", "bench", "--quick", "--encoders", "random_vitt16", "pixels"]
    argv += ["--output-dir", str(out), "--language-model", str(lm), "--data", str(root)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "easy_vqa" and results["language_model"] == str(lm)
    assert list(results["encoders"]) == ["random_vitt16", "pixels"]
    for entry in results["encoders"].values():
        assert 0.0 <= entry["accuracy"] <= 1.0 and set(entry["by_kind"]) == {"yes/no", "shape", "color"}
        assert entry["seconds"] > 0 and entry["settings"]["steps_b"] == 3
    assert 0.0 < results["baseline_majority"] < 1.0
    assert set(results["baseline_question_only"]["by_kind"]) == {"yes/no", "shape", "color"}
    assert "| question only (no image) |" in (out / "report.md").read_text()
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()
    assert "| random_vitt16 |" in capsys.readouterr().out
    # a scored encoder keeps its trained VLM, not its resume checkpoints
    for name in ("random_vitt16", "pixels"):
        assert (out / "runs" / name / "final" / "config.json").is_file()
        assert not (out / "runs" / name / "checkpoints").exists()
    # a second run keeps what is scored: nothing is trained again
    before = (out / "runs" / "pixels" / "score.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "runs" / "pixels" / "score.json").stat().st_mtime_ns == before
    assert "already scored" in capsys.readouterr().err
