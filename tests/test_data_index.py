"""Data at scale: the shared index (tar shards, folders, file lists), the stateless order across
world sizes and resumes, and one curated coin per optimizer step."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eupe.cli import main
from eupe.data import DataConfig, Shuffle, SourceSpec, build_index, build_loader, synthetic_image
from eupe.data import index_build as index_mod
from eupe.data.order import round_keys
from eupe.errors import ConfigError

VIEW = 16


def _jpg(i: int, side: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(5, i, side)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _img2dataset_shards(root: Path, shards: int = 3, per: int = 4) -> None:
    """img2dataset's layout: per sample KEY.jpg + KEY.json + KEY.txt; one member is corrupt."""
    root.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per):
                key = f"{s:05d}{i:04d}"
                data = b"\xff\xd8 not really a jpeg" if (s, i) == (1, 2) else _jpg(s * per + i)
                side = {"jpg": data, "json": json.dumps({"key": key}).encode(), "txt": b"a caption"}
                for ext, payload in side.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _sources(tmp_path: Path) -> list[SourceSpec]:
    _img2dataset_shards(tmp_path / "shards")
    folder = tmp_path / "folder"
    for i, rel in enumerate(["top.jpg", "a/x.jpg", "a/deep/y.jpg", "b/z.png", "b/notes.txt"]):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(_jpg(100 + i) if rel.endswith("jpg") else b"x")
    Image.fromarray(synthetic_image(5, 200, 40)).save(folder / "b/z.png")
    (tmp_path / "list").mkdir()
    for i in range(3):
        (tmp_path / "list" / f"{i}.jpg").write_bytes(_jpg(300 + i))
    (tmp_path / "list" / "files.txt").write_text("# three photos\n0.jpg\n\n  1.jpg  \r\n2.jpg\nmissing.jpg\n")
    return [
        SourceSpec(name="web", type="tar", path=str(tmp_path / "shards")),
        SourceSpec(name="imgs", type="folder", path=str(folder)),
        SourceSpec(name="listed", type="filelist", path=str(tmp_path / "list" / "files.txt"), curated=True),
    ]


def _keys(source) -> list[str]:
    return [source.key(i) for i in range(len(source))]


def test_index_of_tar_shards_folders_and_file_lists(tmp_path: Path) -> None:
    specs = _sources(tmp_path)
    meta = build_index(specs, tmp_path / "idx", workers=2, progress=False)
    assert meta["items"] == 12 + 4 + 4 and meta["bytes_per_item"] == 16
    entries = np.load(tmp_path / "idx" / "entries.npy", mmap_mode="r")
    assert entries.dtype.itemsize == 16 and len(entries) == 20
    assert (tmp_path / "idx" / "entries.npy").stat().st_size <= 16 * 20 + 256  # + the .npy header
    scanned = build_loader(DataConfig(sources=specs), 4, VIEW, 0)
    # the run names its sources differently: an index matches by type and path
    renamed = [SourceSpec(**{**s.__dict__, "name": f"run_{s.name}"}) for s in specs]
    indexed = build_loader(DataConfig(sources=renamed, index=str(tmp_path / "idx")), 4, VIEW, 0)
    for a, b in zip(scanned.sources, indexed.sources):
        assert _keys(a) == _keys(b)
    assert _keys(indexed.sources[1]) == ["top.jpg", "a/deep/y.jpg", "a/x.jpg", "b/z.png"]
    assert _keys(indexed.sources[2]) == ["0.jpg", "1.jpg", "2.jpg", "missing.jpg"]
    assert indexed.sources[0].key(0) == f"00000.tar@{512}"  # member data follows its header
    ta, tb = [next(scanned) for _ in range(6)], [next(indexed) for _ in range(6)]
    assert all((x.views == y.views).all() for x, y in zip(ta, tb))
    skipped = {e["file"].split(":", 1)[1]: e["reason"] for e in indexed.stats()["examples"]}
    assert skipped and all(("member 00001" in r or "no such file" in r) for r in skipped.values())


def test_an_interrupted_build_resumes_and_a_changed_source_is_refused(tmp_path: Path, monkeypatch) -> None:
    specs = _sources(tmp_path)
    scan, calls = index_mod._scan, []

    def dies_after_two(task):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the build is killed mid-way
        calls.append(task[0])
        return scan(task)

    monkeypatch.setattr(index_mod, "_scan", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_index(specs, tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx" / "index.json").exists()  # no half index is ever usable
    monkeypatch.setattr(index_mod, "_scan", lambda task: calls.append(task[0]) or scan(task))
    build_index(specs, tmp_path / "idx", progress=False)
    units = 3 + 3 + 1  # tar shards; folder root, a/, b/; the list
    assert sorted(calls) == list(range(units)) and not (tmp_path / "idx" / "parts").exists()

    with pytest.raises(ConfigError, match="does not cover source 'other'"):
        other = SourceSpec(name="other", type="folder", path=str(tmp_path / "list"))
        build_loader(DataConfig(sources=[other], index=str(tmp_path / "idx")), 2, VIEW, 0)
    with open(tmp_path / "shards" / "00002.tar", "ab") as f:  # a shard rewritten since
        f.write(b"\0" * 1024)
    with pytest.raises(ConfigError, match="data changed, rebuild the index"):
        build_loader(DataConfig(sources=specs, index=str(tmp_path / "idx")), 2, VIEW, 0)
    with pytest.raises(ConfigError, match="not a finished index"):
        build_loader(DataConfig(sources=specs, index=str(tmp_path / "nothing")), 2, VIEW, 0)


def test_cli_data_index(tmp_path: Path, capsys) -> None:
    specs = _sources(tmp_path)
    items = [f"{s.type}:{s.path}" for s in specs]
    assert main(["data", "index", *items, "--out", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out
    assert "20 images in 7 shards" in out and "data.index=" in out
    assert main(["data", "index", "zip:/x", "--out", str(tmp_path / "bad")]) == 2
    assert "not a config or a type:path item" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4099])
def test_shuffle_is_a_bijection_new_each_epoch(n: int) -> None:
    first = Shuffle(n, round_keys(0, 0, 0))(np.arange(n))
    assert np.array_equal(np.sort(first), np.arange(n))
    again = Shuffle(n, round_keys(0, 0, 0))(np.arange(n)[::-1])[::-1]
    assert np.array_equal(first, again)  # any position computable on its own
    if n >= 64:
        second = Shuffle(n, round_keys(0, 0, 1))(np.arange(n))
        assert np.mean(first == second) < 0.1 and abs(np.corrcoef(np.arange(n), first)[0, 1]) < 0.2


def _global_order(
    steps: list[list[int]], world: int, state: dict | None, cfg: DataConfig, batch: int
) -> list:
    """Keys of `len(steps)` global batches read by `world` ranks from `state`."""
    loaders = [build_loader(cfg, batch, VIEW, 7, r, world) for r in range(world)]
    if state:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in steps:
        for loader in loaders:  # rank order = global order within a batch
            out += [p["key"] for p in next(loader).params]
    return out, loaders[0].state_dict()


def test_resume_on_another_world_size_continues_the_same_global_order() -> None:
    n = 30  # global batch 6: an epoch is 5 global batches; run 2 epochs
    cfg = DataConfig(sources=[SourceSpec(name="s", size=n, image_size=VIEW)], curated_prob=0.0)
    reference, _ = _global_order([0] * 10, 1, None, cfg, 6)
    for first, then in ((1, 2), (2, 1), (2, 3)):
        head, state = _global_order([0] * 3, first, None, cfg, 6 // first)
        tail, _ = _global_order([0] * 7, then, state, cfg, 6 // then)
        assert head + tail == reference, (first, then)
    for epoch in (reference[:n], reference[n:]):  # no repeats and no gaps within an epoch
        assert sorted(epoch) == sorted(f"synthetic/{i:08d}" for i in range(n))
    assert reference[:n] != reference[n:]


def test_the_curated_coin_is_drawn_once_per_optimizer_step() -> None:
    cfg = DataConfig(
        sources=[
            SourceSpec(name="pool", size=40, image_size=VIEW),
            SourceSpec(name="inet", size=40, image_size=VIEW, curated=True),
        ],
        curated_prob=0.5,
    )
    loader = build_loader(cfg, 2, VIEW, 0, accum_steps=3)
    streams = [next(loader).stream for _ in range(24)]
    steps = [streams[i : i + 3] for i in range(0, 24, 3)]
    assert all(len(set(s)) == 1 for s in steps)  # one step never mixes sources
    assert {s[0] for s in steps} == {"pool", "curated"}


def test_a_folder_index_pickles_small_and_reopens(tmp_path: Path) -> None:
    """spawn/forkserver DataLoader workers get the index by pickle: reopened, not copied."""
    import pickle

    from eupe.data import Index

    specs = _sources(tmp_path)
    build_index(specs, tmp_path / "idx", progress=False)
    index = Index.open(tmp_path / "idx")
    index.name(index.entries[13])  # maps a names file (an mmap cannot be pickled)
    copy = pickle.loads(pickle.dumps(index))
    assert len(pickle.dumps(index)) < 2000 and np.array_equal(copy.entries, index.entries)
    assert [copy.name(e) for e in copy.entries[12:]] == [index.name(e) for e in index.entries[12:]]


def test_a_state_from_before_the_keyed_shuffle_resumes_with_a_warning() -> None:
    cfg = DataConfig(sources=[SourceSpec(name="s", size=20, image_size=VIEW)])
    loader = build_loader(cfg, 2, VIEW, 0)
    next(loader)
    old = {**loader.state_dict(), "version": 1}
    again = build_loader(cfg, 2, VIEW, 0)
    with pytest.warns(UserWarning, match="different order"):
        again.load_state_dict(old)
    assert again.state_dict()["step"] == 1 and again.state_dict()["version"] == 2
