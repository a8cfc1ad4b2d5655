"""The paper's ablations as configs (configs/paper/ablations/): each validates, builds on the meta
device, names its table in the header, and differs from the paper recipe only where its row says."""

from __future__ import annotations

import dataclasses
import functools
import glob
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from eupe.distill.config import DistillConfig, load_config
from eupe.distill.stages import student_overrides
from eupe.models import count_params, create_model
from eupe.teachers import TeacherSpec, build_teacher_from_spec

ABLATIONS = "configs/paper/ablations"
FILES = sorted(p for p in glob.glob(f"{ABLATIONS}/*.yaml") if not Path(p).name.startswith("_"))
FOUNDATION = {"pe_core_g", "pe_lang_g", "dinov3_hplus"}
TEACHER_SETS = {  # Tables 3/4
    "pec_dv3": {"pe_core_g", "dinov3_hplus"},
    "pec_dv3_s2": {"pe_core_g", "dinov3_hplus", "siglip2_g"},
    "pec_dv3_pel": FOUNDATION,
}
VITB_PARAMS = 85.67e6


@functools.cache
def cfg(path: str) -> DistillConfig:
    return load_config(path)


def ablation(name: str) -> DistillConfig:
    return cfg(f"{ABLATIONS}/{name}.yaml")


def paper(name: str) -> DistillConfig:
    return cfg(f"configs/paper/{name}.yaml")


def as_dict(c: DistillConfig, drop: tuple[str, ...] = ()) -> dict:
    """The resolved config as plain data, without the dotted keys in `drop`."""
    d = OmegaConf.to_container(OmegaConf.structured(c))
    # a plain config's `student` is also its `students.student` (load_config): drop both forms
    drop = (*drop, *(f"students.{k}" for k in drop if k.startswith("student.")))
    for key in drop:
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    return d


def params(c: DistillConfig) -> int:
    # student.init folders do not exist here; the architecture is the same without them
    overrides = student_overrides(dataclasses.replace(c.student, init=None))
    return count_params(create_model(c.student.name, device="meta", **overrides))


@functools.cache
def teacher_dims(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        t = build_teacher_from_spec(name, TeacherSpec(pretrained=False))
    return t.cls_dim, t.patch_dim


def test_every_table_has_its_configs():
    names = {Path(p).stem for p in FILES}
    assert {"table2_stage2_only_vitb16", "table2_stage12_vitb16", "table2_stage13_vitb16"} <= names
    assert "table2_stage123_vitb16" in names
    for s in TEACHER_SETS:
        assert {f"table4_proxy_{s}", f"table3_{s}_stage2_vitb16", f"table3_{s}_stage3_vitb16"} <= names
    assert {f"table10_gamma{g}_vitb16" for g in (0, 1, 2)} <= names
    assert {f"table8_proxy7b_stage{k}" + ("_vitb16" if k > 1 else "") for k in (1, 2, 3)} <= names


@pytest.mark.parametrize("path", FILES)
def test_ablation_validates_builds_on_meta_and_names_its_table(path):
    text = Path(path).read_text()
    table = re.match(r"# Paper Table (\d+)", text)
    assert table, f"{path}: the first line names the paper table ('# Paper Table N ...')"
    assert Path(path).stem.startswith(f"table{table.group(1)}_"), f"{path}: file name and header disagree"
    c = cfg(path)
    assert c.output_dir == f"runs/ablations/{Path(path).stem}"
    n = params(c)
    if c.student.name == "eupe_vitb16":
        assert round(n / 1e4) * 1e4 == pytest.approx(VITB_PARAMS, abs=1e4 + 1)
    elif "proxy7b" in path:
        assert 6.6e9 < n < 6.8e9  # DINOv3-7B's shape
    else:
        assert c.student.name == "eupe_proxy_g16" and 1.8e9 < n < 1.95e9
    for name, spec in c.teachers.items():
        if spec.backend != "eupe":
            assert min(teacher_dims(name)) > 0  # every preset resolves to a buildable model


def test_stage1_ablations_differ_from_the_paper_stage1_only_in_teachers():
    # all inherit ../_stage1_base.yaml; the default-set proxy is built on the paper file itself
    drop = ("teachers", "output_dir")
    assert as_dict(ablation("table4_proxy_pec_dv3"), drop) == as_dict(paper("stage1_proxy"), drop)
    assert as_dict(ablation("table4_proxy_pec_dv3_pel"), ("output_dir",)) == as_dict(
        paper("stage1_proxy"), ("output_dir",)
    )


def test_table2_stage_rows():
    s2, s3 = paper("stage2_vitb16"), paper("stage3_vitb16")
    only = ablation("table2_stage2_only_vitb16")
    assert set(only.teachers) == FOUNDATION and only.stage == "fixed" and only.student.resolution == 256
    assert (only.student.name, only.student.init, only.heads.hidden_dim) == ("eupe_vitb16", None, 3072)
    assert as_dict(only)["train"] == as_dict(s2)["train"]  # the Stage-2 recipe, restated
    assert (only.distill, only.norm, only.data) == (s2.distill, s2.norm, s2.data)

    s12 = ablation("table2_stage12_vitb16")
    assert as_dict(s12, ("output_dir",)) == as_dict(s2, ("output_dir",))

    s13 = ablation("table2_stage13_vitb16")
    assert s13.stage == "pyramid" and s13.pyramid == [256, 384, 512] and list(s13.teachers) == ["proxy"]
    assert s13.student.from_scratch and s13.student.init is None  # no Stage 2: a fresh student
    t13, t2 = s13.train, s2.train
    assert (t13.max_steps, t13.global_batch, t13.lr) == (t2.max_steps, t2.global_batch, t2.lr)

    s123 = ablation("table2_stage123_vitb16")
    assert s123.student.init == f"{s12.output_dir}/final"
    drop = ("output_dir", "student.init")
    assert as_dict(s123, drop) == as_dict(s3, drop)


@pytest.mark.parametrize("teacher_set", sorted(TEACHER_SETS))
def test_table3_and_4_teacher_sets(teacher_set):
    proxy = ablation(f"table4_proxy_{teacher_set}")
    assert set(proxy.teachers) == TEACHER_SETS[teacher_set]
    s2 = ablation(f"table3_{teacher_set}_stage2_vitb16")
    s3 = ablation(f"table3_{teacher_set}_stage3_vitb16")
    for student in (s2, s3):
        assert student.teachers["proxy"].checkpoint == f"{proxy.output_dir}/final"
    assert s3.student.init == f"{s2.output_dir}/final"
    drop = ("output_dir", "teachers.proxy.checkpoint", "student.init")
    assert as_dict(s2, drop) == as_dict(paper("stage2_vitb16"), drop)
    assert as_dict(s3, drop) == as_dict(paper("stage3_vitb16"), drop)


@pytest.mark.parametrize("gamma", [0, 1, 2])
def test_table10_gamma_on_dinov3_patch_loss(gamma):
    c = ablation(f"table10_gamma{gamma}_vitb16")
    assert {n: t.patch_weight for n, t in c.teachers.items()} == {
        "pe_core_g": 1.0,
        "pe_lang_g": 1.0,
        "dinov3_hplus": float(gamma),
    }
    drop = ("output_dir", "teachers.dinov3_hplus.patch_weight")
    assert as_dict(c, drop) == as_dict(ablation("table2_stage2_only_vitb16"), drop)


def test_table8_seven_b_proxy():
    s1 = ablation("table8_proxy7b_stage1")
    assert set(s1.teachers) == {"pe_core_g", "pe_lang_g", "dinov3_7b"}
    assert teacher_dims("dinov3_7b") == (4096, 4096)
    drop = ("output_dir", "teachers", "student.overrides")
    assert as_dict(s1, drop) == as_dict(paper("stage1_proxy"), drop)
    s2, s3 = ablation("table8_proxy7b_stage2_vitb16"), ablation("table8_proxy7b_stage3_vitb16")
    assert s2.teachers["proxy"].checkpoint == s3.teachers["proxy"].checkpoint == f"{s1.output_dir}/final"
    assert s3.student.init == f"{s2.output_dir}/final"
