"""The lmms-eval path of the VLM benchmarks: lmms-eval's own scoring on hand-made answers, the data
layout and pipeline end to end with an oracle model, and a tiny real LLaVA folder on all six tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytest.importorskip("lmms_eval")
pytest.importorskip("transformers")

import datasets  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402

from eupe.errors import ConfigError  # noqa: E402
from eupe.vlm.bench import TASKS, EupeLlava, base_config, run_vlm_eval, task_manager  # noqa: E402
from eupe.vlm.bench_data import write_benchmark_data  # noqa: E402

PERCEPTION = {"existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark"}
PERCEPTION |= {"artwork", "OCR"}
TINY_LM = OmegaConf.to_container(  # the tiny config's language model: 2 random Llama layers
    OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "vlm" / "tiny.yaml").language_model
)


@pytest.fixture(scope="module")
def manager():
    return task_manager()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random tiny LLaVA saved as `eupe vlm train` saves its final/ (ViT-T/16 at 64 px)."""
    from eupe.vlm.model import build_llava

    model, processor = build_llava("eupe_vitt16", TINY_LM, tokenizer="byte", image_size=64)
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return write_benchmark_data(tmp_path_factory.mktemp("bench"), list(TASKS), n=8)


def scorer(manager, task):
    """lmms-eval's process_results and aggregations of `task`, as its yaml loads them."""
    config = base_config(manager, task)
    aggregate = {m["metric"]: m["aggregation"] for m in config["metric_list"]}
    return config["process_results"], aggregate


def test_textvqa_accuracy_is_the_official_leave_one_out_average(manager):
    process, _ = scorer(manager, "textvqa_val")

    def accuracy(answer, matches):
        doc = {"question_id": 1, "answers": ["red sign"] * matches + ["stop"] * (10 - matches)}
        return process(doc, [answer])["exact_match"]

    # 2 matching references: 2 of the 10 leave-one-out subsets keep 1 (1/3), 8 keep 2 (2/3)
    assert accuracy("Red sign.", 2) == pytest.approx(0.6)
    assert accuracy("red sign", 4) == pytest.approx(1.0)
    assert accuracy("red sign", 3) == pytest.approx(0.9)  # 3 of 10 subsets keep only 2 of them
    assert accuracy("blue", 10) == 0.0


def test_pope_precision_recall_f1(manager):
    process, aggregate = scorer(manager, "pope")
    pairs = [("yes", "yes")] * 3 + [("no", "yes")] + [("yes", "no")] * 2 + [("no", "no")] * 2  # (gt, pred)
    items = [process({"question_id": str(i), "answer": gt}, [pred]) for i, (gt, pred) in enumerate(pairs)]

    def score(metric):
        return aggregate[metric]([item[metric] for item in items])

    precision, recall = 3 / 4, 3 / 5
    assert score("pope_precision") == pytest.approx(precision)
    assert score("pope_recall") == pytest.approx(recall)
    assert score("pope_f1_score") == pytest.approx(2 * precision * recall / (precision + recall))
    assert score("pope_accuracy") == pytest.approx(5 / 8)


def test_mme_perception_sums_acc_and_acc_plus_per_category(manager):
    process, aggregate = scorer(manager, "mme")
    answers = [  # (category, image, gt, pred)
        ("existence", "e1", "Yes", "Yes"),
        ("existence", "e1", "No", "no."),  # both right: acc 100 + acc+ 100
        ("existence", "e2", "Yes", "Yes"),
        ("existence", "e2", "No", "Yes"),  # one right: 50 + 0 -> category (200 + 50) / 2 = 125
        ("count", "c1", "Yes", "No"),
        ("count", "c1", "No", "Yes"),  # 0
        ("OCR", "o1", "Yes", "yes"),
        ("OCR", "o1", "No", "No"),  # 200
        ("code_reasoning", "r1", "Yes", "Yes"),
        ("code_reasoning", "r1", "No", "No"),  # cognition: not in perception
    ]
    scored = [process({"question_id": q, "category": c, "answer": gt}, [p]) for c, q, gt, p in answers]
    perception = [s["mme_perception_score"] for s in scored if "mme_perception_score" in s]
    cognition = [s["mme_cognition_score"] for s in scored if "mme_cognition_score" in s]
    assert aggregate["mme_perception_score"](perception) == pytest.approx(125 + 0 + 200)
    assert aggregate["mme_cognition_score"](cognition) == pytest.approx(200)


def truth(task, doc):
    if task == "textvqa_val":
        return doc["answers"][0]
    if task == "scienceqa_img":
        return "ABCDE"[doc["answer"]]
    return doc["answer"]


class Oracle(lmms):
    """Answers every question with its reference answer (and keeps the prompts it was given)."""

    def __init__(self):
        super().__init__()
        self.prompts = {}

    def generate_until(self, requests):
        out = []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            assert len(doc_to_visual(doc)) == 1  # every record carries its image (GQA's joined in)
            self.prompts.setdefault(task, []).append(context)
            out.append(truth(task, doc))
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError

    def generate_until_multi_round(self, requests):
        raise NotImplementedError


def test_oracle_scores_perfectly_on_generated_data(bench_dir, tmp_path):
    oracle = Oracle()
    results = run_vlm_eval("oracle", list(TASKS), tmp_path, data_dir=bench_dir, lm=oracle)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    categories = set(datasets.load_from_disk(str(bench_dir / "mme"))["test"]["category"])
    assert 0 < len(categories & PERCEPTION) < len(categories)  # perception and cognition present
    for task, bench in TASKS.items():
        result = results[task]
        expected = 200.0 * len(categories & PERCEPTION) if task == "mme" else 1.0
        assert (result["metric"], result["value"], result["status"]) == (bench.metric, expected, "ok"), task
        assert result["extra"]["label"] == bench.label and result["extra"]["samples"] == 8
        assert result["extra"]["lmms_eval"][bench.key] == result["value"]
        assert result["settings"]["textvqa_ocr"] is False
        assert result["dataset"] == str(bench_dir / task)
        samples = (tmp_path / "samples" / f"{task}.jsonl").read_text().splitlines()
        assert len(samples) == 8 and "resps" in json.loads(samples[0])
    assert not any("Reference OCR token" in p for p in oracle.prompts["textvqa_val"])
    assert list((tmp_path / "submissions").iterdir())  # TextVQA's submission file, not in the cwd


def test_textvqa_ocr_tokens_are_a_switch(bench_dir, tmp_path):
    oracle = Oracle()
    results = run_vlm_eval(
        "oracle", ["textvqa_val"], tmp_path, data_dir=bench_dir, lm=oracle, textvqa_ocr=True
    )
    assert results["textvqa_val"]["settings"]["textvqa_ocr"] is True
    assert all("\nReference OCR token: " in p for p in oracle.prompts["textvqa_val"])


def test_tiny_llava_folder_on_all_six_tasks(bench_dir, tiny_folder, tmp_path, one_torch_thread):
    folder = tiny_folder
    out = tmp_path / "eval"
    results = run_vlm_eval(
        folder, list(TASKS), out, limit=2, data_dir=bench_dir, device="cpu", max_new_tokens=6
    )
    written = json.loads((out / "results.json").read_text())
    assert list(written) == list(TASKS)
    for task, bench in TASKS.items():
        result = written[task]
        assert result["metric"] == bench.metric and result["status"] == "ok", task
        assert math.isfinite(result["value"]) and result["extra"]["samples"] == 2
        assert result["model"] == str(folder) and result["settings"]["device"] == "cpu"
    assert results == written

    lm = EupeLlava(str(folder), device="cpu")
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([])


def test_unknown_task_is_a_config_error(tmp_path):
    with pytest.raises(
        ConfigError, match="supported: textvqa_val, scienceqa_img, realworldqa, pope, gqa, mme"
    ):
        run_vlm_eval("unused", ["textvqa_val", "vqav2"], tmp_path, lm=Oracle())


def test_missing_data_folder_is_a_config_error(bench_dir, tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "pope")):
        run_vlm_eval("unused", ["pope"], tmp_path / "out", data_dir=tmp_path, lm=Oracle())
    (tmp_path / "gqa").symlink_to(bench_dir / "gqa")  # questions without the images set
    with pytest.raises(ConfigError, match=str(tmp_path / "gqa_images")):
        run_vlm_eval("unused", ["gqa"], tmp_path / "out", data_dir=tmp_path, lm=Oracle())
    with pytest.raises(ConfigError, match="even limit"):
        run_vlm_eval("unused", ["mme"], tmp_path / "out", data_dir=bench_dir, limit=3, lm=Oracle())


def test_importing_lmms_eval_leaves_truncated_images_corrupt():
    """lmms-eval turns PIL's LOAD_TRUNCATED_IMAGES on at import; eupe's loaders must still skip them."""
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("caller", [True, False])
def test_evaluation_restores_the_callers_truncated_images_setting(monkeypatch, tmp_path, caller):
    """LOAD_TRUNCATED_IMAGES is on while lmms-eval evaluates, then back to what the caller had set."""
    from PIL import ImageFile

    from eupe.vlm import bench

    seen = []
    monkeypatch.setattr(bench, "simple_evaluate", lambda **kw: seen.append(ImageFile.LOAD_TRUNCATED_IMAGES))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", caller)
    bench.evaluate(None, [], None, None, tmp_path)
    assert seen == [True] and ImageFile.LOAD_TRUNCATED_IMAGES is caller


def test_cli_vlm_eval_writes_results_and_prints_a_table(
    bench_dir, tiny_folder, tmp_path, capsys, one_torch_thread
):
    from eupe.cli import main

    args = ["vlm", "eval", "--model", str(tiny_folder), "--tasks", "pope,mme", "--limit", "2"]
    assert main([*args, "--data-dir", str(bench_dir), "--output-dir", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "pope" in shown and "mme_perception" in shown and "results.json" in shown
    assert list(json.loads((tmp_path / "out" / "results.json").read_text())) == ["pope", "mme"]
    assert main(["vlm", "eval", "--model", "x", "--tasks", "vqav2", "--output-dir", str(tmp_path)]) == 2


def test_suite_scores_a_llava_folder_through_the_cli(bench_dir, tiny_folder, tmp_path, one_torch_thread):
    from eupe.cli import main

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        f"models: [{{name: tiny, model: eupe_vitt16, vlm: {tiny_folder}}}]\n"
        f"vlm: {{tasks: [pope, gqa], limit: 2, data_dir: {bench_dir}, device: cpu}}\n"
    )
    assert main(["eval", "suite", str(suite)]) == 0
    assert (tmp_path / "out" / "tiny" / "vlm" / "results.json").is_file()
    header = (tmp_path / "out" / "table.md").read_text().splitlines()[2]
    assert "POPE f1" in header and "GQA accuracy" in header
