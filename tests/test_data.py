"""Data pipeline: every source type, corrupt files, determinism, resume, rank sharding, mixing, replay."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from eupe.data import (
    AugmentConfig,
    DataConfig,
    SourceSpec,
    build_loader,
    replay_view,
    synthetic_image,
    validate_data,
)
from eupe.errors import ConfigError

VIEW = 24


def _png_bytes(i: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(7, i, size)).save(buf, format="PNG")
    return buf.getvalue()


def _jpg_bytes(i: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(7, i, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bad_files() -> dict[str, bytes]:
    """A corrupt JPEG (valid header, garbage body), a truncated PNG and a text file named .jpg."""
    rng = np.random.default_rng(0)
    return {
        "bad/corrupt.jpg": _jpg_bytes(99)[:30] + rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "bad/truncated.png": _png_bytes(98)[:200],
        "bad/notes.jpg": b"this is not an image\n",
    }


def _write_folder(root: Path, n: int = 12) -> list[str]:
    names = []
    for i in range(n):
        sub = f"class{i % 3}" if i % 2 else ""  # class subfolders optional: mix both
        name = f"{sub}/img{i:02d}.png" if sub else f"img{i:02d}.jpg"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes(i) if name.endswith(".png") else _jpg_bytes(i))
        names.append(name)
    for name, data in _bad_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "readme.txt").write_text("ignored: not an image extension")
    return names


def _cfg(*sources: SourceSpec, **kw) -> DataConfig:
    return DataConfig(sources=list(sources), **kw)


def _take(loader, n: int):
    return [next(loader) for _ in range(n)]


def _all_keys(batches) -> list[str]:
    return [f"{p['source_name']}:{p['key']}" for b in batches for p in b.params]


def _check_bad_skipped(loader, batches) -> None:
    keys = _all_keys(batches)
    assert not any(k.split(":", 1)[1].startswith("bad/") for k in keys)
    stats = loader.stats()
    assert stats["skipped"] >= 3
    bad = {e["file"].split(":", 1)[1] for e in stats["examples"]}
    assert bad == set(_bad_files())


def test_folder_source_skips_bad_files(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    loader = build_loader(_cfg(SourceSpec(name="f", type="folder", path=str(tmp_path))), 5, VIEW, seed=0)
    batches = _take(loader, 6)  # 30 draws over 15 items: two epochs, every bad file met
    assert batches[0].views.shape == (5, 3, VIEW, VIEW) and batches[0].views.dtype == torch.float32
    assert 0.0 <= float(batches[0].views.min()) and float(batches[0].views.max()) <= 1.0
    _check_bad_skipped(loader, batches)


def test_filelist_source(tmp_path: Path) -> None:
    names = _write_folder(tmp_path / "imgs")
    lines = ["# comment", ""] + [f"imgs/{n}" for n in names] + [f"imgs/{n}" for n in _bad_files()]
    lines.append("imgs/missing.jpg")
    (tmp_path / "list.txt").write_text("\n".join(lines))
    loader = build_loader(
        _cfg(SourceSpec(name="l", type="filelist", path=str(tmp_path / "list.txt"))), 4, VIEW, 0
    )
    batches = _take(loader, 8)
    assert set(_all_keys(batches)) <= {f"l:imgs/{n}" for n in names}
    assert loader.stats()["skipped"] >= 4


def test_tar_source(tmp_path: Path) -> None:
    files = {f"{i:04d}.jpg": _jpg_bytes(i) for i in range(6)} | {f"{i:04d}.cls": b"3" for i in range(6)}
    files |= {name.replace("/", "_"): data for name, data in _bad_files().items()}
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:05d}.tar", "w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"s{shard}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    loader = build_loader(_cfg(SourceSpec(name="t", type="tar", path=str(tmp_path))), 6, VIEW, 0)
    assert len(loader.sources[0]) == 2 * (6 + 3)  # images by extension; .cls members ignored
    good = set()
    for shard in range(2):  # keys are `<shard>@<member offset>`: the readable members' offsets
        with tarfile.open(tmp_path / f"shard-{shard:05d}.tar") as tar:
            good |= {
                f"t:shard-{shard:05d}.tar@{m.offset_data}"
                for m in tar
                if m.name.endswith(".jpg") and "bad" not in m.name
            }
    batches = _take(loader, 6)
    assert set(_all_keys(batches)) <= good
    assert loader.stats()["skipped"] >= 6
    reasons = " ".join(e["reason"] for e in loader.stats()["examples"])
    assert "(member s0/bad_" in reasons or "(member s1/bad_" in reasons  # bad members are named


def test_missing_source_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_loader(_cfg(SourceSpec(name="f", type="folder", path=str(tmp_path / "nope"))), 2, VIEW, 0)
    with pytest.raises(ConfigError, match="curated_prob"):
        validate_data(_cfg(SourceSpec(), curated_prob=1.5))
    with pytest.raises(ConfigError, match="type"):
        validate_data(_cfg(SourceSpec(type="s3")))


def test_config_is_structured_and_overridable() -> None:
    base = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(["curated_prob=0.25", "augment.flip_p=0.0"]))
    cfg = OmegaConf.to_object(merged)
    assert cfg.curated_prob == 0.25 and cfg.augment.flip_p == 0.0 and cfg.teacher_cache is None


SYN = _cfg(
    SourceSpec(name="pool", size=64, image_size=40),
    SourceSpec(name="imnet", size=32, image_size=32, curated=True),
    curated_prob=0.3,
)


def test_deterministic_and_seed_dependent() -> None:
    a = _take(build_loader(SYN, 4, VIEW, seed=3), 4)
    b = _take(build_loader(SYN, 4, VIEW, seed=3), 4)
    c = _take(build_loader(SYN, 4, VIEW, seed=4), 4)
    assert all(torch.equal(x.views, y.views) and x.params == y.params for x, y in zip(a, b))
    assert not all(torch.equal(x.views, y.views) for x, y in zip(a, c))


def test_workers_give_the_same_batches() -> None:
    cfg = _cfg(*SYN.sources, curated_prob=SYN.curated_prob, num_workers=2)
    a = _take(build_loader(SYN, 4, VIEW, seed=1), 3)
    b = _take(build_loader(cfg, 4, VIEW, seed=1), 3)
    assert all(torch.equal(x.views, y.views) for x, y in zip(a, b))
    # workers sending uint8 crops, finished batched by the loader (data.device_augment)
    cfg.device_augment, cfg.persistent_workers, cfg.prefetch_factor = True, False, 1
    c = _take(build_loader(cfg, 4, VIEW, seed=1), 3)
    assert all((x.views - y.views).abs().max() < 1e-6 for x, y in zip(a, c))


def test_resume_mid_epoch_is_exact() -> None:
    import json

    full = _take(build_loader(SYN, 4, VIEW, seed=2), 7)
    first = build_loader(SYN, 4, VIEW, seed=2)
    _take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = build_loader(SYN, 4, VIEW, seed=2)
    resumed.load_state_dict(state)
    rest = _take(resumed, 4)
    assert all(torch.equal(x.views, y.views) and x.params == y.params for x, y in zip(full[3:], rest))
    # persistent workers already running rewind to a restored state
    workers = build_loader(_cfg(*SYN.sources, curated_prob=SYN.curated_prob, num_workers=2), 4, VIEW, seed=2)
    _take(workers, 5)
    workers.load_state_dict(state)
    assert all(torch.equal(x.views, y.views) for x, y in zip(full[3:5], _take(workers, 2)))


def test_ranks_share_no_item_within_an_epoch() -> None:
    cfg = _cfg(SourceSpec(name="pool", size=48, image_size=32))
    seen: list[str] = []
    for rank in range(2):
        loader = build_loader(cfg, 4, VIEW, seed=0, rank=rank, world_size=2)
        seen += _all_keys(_take(loader, 6))  # 6 steps x 4 x 2 ranks = 48 = one epoch
    assert len(seen) == 48 and len(set(seen)) == 48
    # the two ranks together draw exactly what one process with the global batch draws
    single = _all_keys(_take(build_loader(cfg, 8, VIEW, seed=0), 6))
    assert sorted(single) == sorted(seen)


def test_mixing_probability_and_homogeneous_batches() -> None:
    cfg = _cfg(*SYN.sources, curated_prob=0.3)
    loader = build_loader(cfg, 2, 16, seed=0)
    streams = []
    for _ in range(200):
        plan_stream, _, entries = loader.plan.next()  # plan only: no decoding needed for the ratio
        streams.append(plan_stream)
        assert len({e[2] for e in entries}) == 1  # one source per batch here (one source per stream)
    frac = streams.count("curated") / len(streams)
    assert 0.2 < frac < 0.4
    batch = next(build_loader(cfg, 6, 16, seed=5))
    names = {p["source_name"] for p in batch.params}
    assert names == ({"imnet"} if batch.stream == "curated" else {"pool"})


def test_replay_view_is_exact() -> None:
    loader = build_loader(SYN, 6, 32, seed=9)
    batches = _take(loader, 3)
    for batch in batches:
        for i, params in enumerate(batch.params):
            view = replay_view(loader.load_source_image(params), params, 32)
            assert torch.equal(view, batch.views[i])
    params = [p for b in batches for p in b.params]
    assert {"crop", "flip", "jitter", "blur_sigma", "solarize", "source", "key"} <= set(params[0])
    # the 18 views exercise both branches of every augmentation, so replay covered them all
    for flag in (lambda p: p["flip"], lambda p: p["jitter"] is not None, lambda p: p["blur_sigma"] > 0):
        assert {bool(flag(p)) for p in params} == {True, False}
    assert any(p["solarize"] for p in params)


def test_truncated_tar_shard_keeps_readable_members(tmp_path: Path) -> None:
    shard = tmp_path / "cut.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            data = _png_bytes(i, 48)
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        third = members[2]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: third.offset_data + third.size // 2])  # cut inside the third image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged shard warns; the run goes on
        loader = build_loader(_cfg(SourceSpec(name="t", type="tar", path=str(shard))), 4, VIEW, 0)
    batches = _take(loader, 3)
    keys = set(_all_keys(batches))
    first_two = {f"t:cut.tar@{m.offset_data}" for m in members[:2]}
    assert first_two <= keys and f"t:cut.tar@{members[3].offset_data}" not in keys
    assert len(loader.sources[0]) == 3  # the cut member is indexed (its header is intact) ...
    assert f"t:cut.tar@{third.offset_data}" not in keys and loader.stats()["skipped"] > 0  # ... and skipped


def test_one_pass_sharding_and_fresh_views_for_a_cache() -> None:
    from eupe.data import load_source_image, make_view, open_sources, shard_items

    cfg = _cfg(SourceSpec(name="a", size=7, image_size=32), SourceSpec(name="b", size=4, image_size=32))
    sources = open_sources(cfg, seed=0)
    shards = [list(shard_items(sources, r, 3)) for r in range(3)]
    flat = [x for shard in shards for x in shard]
    assert len(flat) == 11 and len(set(flat)) == 11 and max(map(len, shards)) - min(map(len, shards)) <= 1
    s, i, key = shards[1][2]
    image = sources[s].load(i)
    view, params = make_view(image, cfg.augment, 16, [0, s, i, 3])  # view k=3 of this image
    params.update(source=s, index=i, key=key)
    assert torch.equal(replay_view(load_source_image(sources, params), params, 16), view)
    assert not torch.equal(make_view(image, cfg.augment, 16, [0, s, i, 4])[0], view)


def test_resume_on_another_world_size() -> None:
    cfg = _cfg(SourceSpec(name="pool", size=40, image_size=32))
    single = build_loader(cfg, 8, VIEW, seed=0)
    _take(single, 2)
    state = single.state_dict()
    expected = sorted(_all_keys(_take(single, 2)))
    got = []
    for rank in range(2):
        loader = build_loader(cfg, 4, VIEW, seed=0, rank=rank, world_size=2)
        loader.load_state_dict(state)  # same global batch (2 x 4), continues at the same position
        got += _all_keys(_take(loader, 2))
    assert sorted(got) == expected


def test_batched_photometric_ops_match_torchvision() -> None:
    """Per-view factors in one batch: each view equals torchvision's op on that view alone."""
    import torchvision.transforms.v2.functional as TF

    from eupe.data.photometric import _jitter, blur_size, gaussian_blur

    images = torch.rand(5, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    ref = {
        "brightness": TF.adjust_brightness,
        "contrast": TF.adjust_contrast,
        "saturation": TF.adjust_saturation,
        "hue": TF.adjust_hue,
    }
    factors = {op: [0.6, 0.9, 1.0, 1.2, 1.4] for op in ref} | {"hue": [-0.5, -0.1, 0.0, 0.07, 0.3]}
    for op, fn in ref.items():
        out = _jitter(op, images.clone(), torch.tensor(factors[op]))
        for i, f in enumerate(factors[op]):
            assert torch.allclose(out[i], fn(images[i], f), atol=1e-5), op
    sigmas = [0.3, 1.3, 2.0, 0.8, 1.0]
    out = gaussian_blur(images, sigmas)
    for i, sigma in enumerate(sigmas):  # zero-padded kernels: each view blurred as on its own
        k = blur_size(sigma, 20)
        assert torch.allclose(out[i], TF.gaussian_blur(images[i], [k, k], [sigma, sigma]), atol=1e-5)


def _photo_folder(root: Path, n: int = 6) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(synthetic_image(11, i, 96)).resize((300, 220)).save(root / f"{i}.jpg", quality=92)


def test_device_augment_matches_the_worker_path_and_the_float_reference(tmp_path: Path) -> None:
    """data.device_augment (uint8 batches, photometric half batched on the device; here the CPU)
    equals the per-view worker path to float rounding, and both stay within quantisation of the
    float32 crop-and-resize pipeline the loader used before (cached targets keep replaying: a
    network's features of the two agree to cosine > 0.999)."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    from eupe.data import finish_views
    from eupe.models import create_model

    _photo_folder(tmp_path / "p")
    aug = {"jitter_p": 1.0, "blur_p": 0.7, "solarize_p": 0.3}
    src = SourceSpec(name="p", type="folder", path=str(tmp_path / "p"))
    on = build_loader(_cfg(src, device_augment=True, augment=AugmentConfig(**aug)), 12, 32, seed=3)
    off = build_loader(_cfg(src, device_augment=False, augment=AugmentConfig(**aug)), 12, 32, seed=3)
    a, b = next(on), next(off)
    assert a.params == b.params and a.views.dtype == torch.float32
    assert (a.views - b.views).abs().max() < 1e-5
    ref = []
    for p in a.params:  # before: float32 image -> resized crop -> flip -> photometric
        image = torch.from_numpy(np.array(on.load_source_image(p))).permute(2, 0, 1).float() / 255
        view = TF.resized_crop(image, *p["crop"], [32, 32], InterpolationMode.BILINEAR, antialias=True)
        ref.append(finish_views((view.flip(-1) if p["flip"] else view)[None], [p])[0])
    diff = (torch.stack(ref) - a.views).abs()
    assert diff.mean() < 0.5 / 255 and diff.max() < 4.0 / 255, (
        diff.mean() * 255,
        diff.max() * 255,
    )  # measured 0.17, 2.0
    net = create_model("eupe_vitp16").eval()
    with torch.no_grad():
        fa, fr = net(a.views), net(torch.stack(ref))
    for k in ("cls", "patches"):
        cos = torch.nn.functional.cosine_similarity(getattr(fa, k), getattr(fr, k), dim=-1)
        assert cos.min() > 0.999, (k, cos.min())


def test_decode_min_side_auto_keeps_the_smallest_crop_unscaled(tmp_path: Path) -> None:
    from eupe.data import decode_side

    cfg = _cfg(SourceSpec(name="f", type="folder", path=str(tmp_path)))
    assert cfg.decode_min_side == "auto" and decode_side(cfg, 256) == 453  # 256 / sqrt(0.32)
    Image.fromarray(synthetic_image(3, 0, 64)).resize((2000, 1600)).save(tmp_path / "big.jpg", quality=90)
    loader = build_loader(cfg, 1, 256, 0)
    p = next(loader).params[0]
    assert p["image_size"] == [1000, 800] and p["decode_min_side"] == 453  # 1/2 scale: 800 >= 453
    with pytest.raises(ConfigError, match="decode_min_side"):
        validate_data(_cfg(SourceSpec(), decode_min_side="big"))


def test_folder_with_a_symlink_cycle(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(_png_bytes(0))
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    loader = build_loader(_cfg(SourceSpec(name="f", type="folder", path=str(tmp_path))), 2, VIEW, 0)
    source = loader.sources[0]
    assert [source.key(i) for i in range(len(source))] == ["a/x.png"]


def test_reduced_jpeg_decode_is_replayable(tmp_path: Path) -> None:
    big = Image.fromarray(synthetic_image(3, 0, 64)).resize((800, 600))
    big.save(tmp_path / "big.jpg", quality=90)
    cfg = _cfg(SourceSpec(name="f", type="folder", path=str(tmp_path)), decode_min_side=128)
    loader = build_loader(cfg, 2, VIEW, 0)
    batch = next(loader)
    assert batch.params[0]["image_size"] == [200, 150]  # 1/4 scale: the smallest with sides >= 128
    view = replay_view(loader.load_source_image(batch.params[0]), batch.params[0], VIEW)
    assert torch.equal(view, batch.views[0])


def test_data_check_finds_every_bad_file(tmp_path: Path) -> None:
    from eupe.data.check import check_sources, save_preview

    names = _write_folder(tmp_path / "imgs")
    cfg = _cfg(SourceSpec(name="f", type="folder", path=str(tmp_path / "imgs")))
    report = check_sources(cfg, progress=False)
    assert report["checked"] == len(names) + 3 and report["bad"] == 3
    assert {b["file"] for b in report["bad_files"]} == {f"f:{n}" for n in _bad_files()}
    assert report["sources"][0]["min_side"]["median"] == 40
    png = save_preview(cfg, tmp_path / "views.png", n=4, view_size=16)
    assert Image.open(png).size == (2 * 18, 2 * 18)


def test_a_whole_image_at_its_own_size_is_used_as_it_is():
    """A kept-whole view (crop = the image, same side) skips the resize; it would be the identity."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from eupe.data.augment import apply_params

    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = {"crop": [0, 0, 24, 24], "flip": False}
    resized = TF.resized_crop(image, 0, 0, 24, 24, [24, 24], InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(apply_params(image, params, 24), resized.float() / 255)
    view = apply_params(image, params, 24)
    view.mul_(0)
    assert image.abs().sum() > 0  # a copy: the caller's tensor is untouched
    smaller = apply_params(image, params, 12)
    assert smaller.shape == (3, 12, 12)
