"""Measure the demo's two experts on this machine; writes JSON (default benchmarks/results/demo_experts.json).

1. EfficientNet-Lite0 (converted package weights): ImageNet top-3 on skimage chelsea/coffee, and
   leave-one-out 1-NN accuracy of its pooled features on the Tux Paint cut-outs (the 17 categories
   with >= 12 images), pretrained vs random weights; with and without counting a cut-out's mirrored
   copy as a neighbour.
2. PP-OCRv4 detector: which internal tensor is the best patch target. For each candidate, a
   logistic-regression per-pixel probe on rendered-text images (train seed 100, test seed 0),
   IoU at stride-4 resolution against the glyph mask and the line-region mask; RGB vs BGR input.
3. ms/image for both experts at 224 and 256 (batch 1 and 16) with this process's torch threads.

    .venv/bin/python benchmarks/demo_experts.py [--out FILE] [--n-text 160]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from eupe.demo import data as D
from eupe.demo.assets import load_assets, make_splits
from eupe.demo.experts import (
    EFFNET_MEAN,
    EFFNET_STD,
    EFFNET_TIMM_NAME,
    OCR_FEATURE,
    OCR_OUTPUT,
    convert_effnet_lite0,
    ocr_det_model,
)

OCR_CANDIDATES = {  # tensor -> description (names from the shipped graph, shapes at 256 input)
    "p2o.Add.147": "backbone stride-16 stage output (192ch)",
    "p2o.Add.215": "backbone stride-32 stage output (384ch)",
    "p2o.Add.251": "neck top-down merge, stride 8 (96ch)",
    "p2o.Add.249": "neck top-down merge, stride 16 (96ch)",
    "p2o.Add.265": "neck RSE output, stride 16 (24ch)",
    "p2o.Concat.1": "neck fused output feeding the DB head, stride 4 (96ch)",
    OCR_OUTPUT: "final text probability (1ch, full res)",
}


def to_tensor(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def effnet(weights: Path | None) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(EFFNET_TIMM_NAME, pretrained=False)
    if weights is not None:
        m.load_state_dict(load_file(str(weights)))
    return m.eval()


@torch.inference_mode()
def pooled(model: torch.nn.Module, images: np.ndarray, bs: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(images), bs):
        x = to_tensor(images[i : i + bs], EFFNET_MEAN, EFFNET_STD)
        out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return F.normalize(torch.cat(out), dim=1)


def loo_1nn(feats: torch.Tensor, labels: np.ndarray, groups: list[str], exclude_group: bool) -> float:
    sim = feats @ feats.T
    sim.fill_diagonal_(-2)
    if exclude_group:
        g = np.array(groups)
        same = torch.from_numpy(g[:, None] == g[None, :])
        sim[same] = -2
    nn_idx = sim.argmax(1).numpy()
    return float((labels[nn_idx] == labels).mean())


class OnnxFeatures:
    """Run the detector with extra named outputs (what the onnx teacher backend does generically)."""

    def __init__(self, path: Path, names: list[str], threads: int):
        model = onnx.load(str(path))
        have = {o.name for o in model.graph.output}
        for n in names:
            if n not in have:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.names = names

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.sess.run(self.names, {"x": x.astype(np.float32)})))


def ocr_input(images: np.ndarray, bgr: bool) -> np.ndarray:
    x = to_tensor(images[..., ::-1] if bgr else images, (0.5,) * 3, (0.5,) * 3).numpy()
    return x


def text_probe_iou(feats_tr: np.ndarray, m_tr: np.ndarray, feats_te: np.ndarray, m_te: np.ndarray) -> float:
    """Per-pixel logistic regression on features upsampled to the mask grid; IoU of text pixels.

    Fits on 40k sampled training pixels; predicts the test maps image by image (memory stays small).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    n, c, h, w = feats_tr.shape
    rng = np.random.default_rng(0)
    idx = rng.choice(n * h * w, size=min(n * h * w, 40000), replace=False)
    img, rest = np.divmod(idx, h * w)
    ys, xs = np.divmod(rest, w)
    x = feats_tr[img, :, ys, xs].astype(np.float32)
    y = m_tr[img, ys, xs]
    sc = StandardScaler().fit(x)
    clf = LogisticRegression(max_iter=300, C=1.0, class_weight="balanced").fit(sc.transform(x), y)
    inter = union = 0
    for f, m in zip(feats_te, m_te):
        pred = clf.predict(sc.transform(f.reshape(c, -1).T.astype(np.float32))).astype(bool)
        gt = m.reshape(-1)
        inter += int((pred & gt).sum())
        union += int((pred | gt).sum())
    return inter / max(1, union)


def resize_maps(f: np.ndarray, side: int) -> np.ndarray:
    f = F.interpolate(torch.from_numpy(f).float(), size=(side, side), mode="bilinear", align_corners=False)
    return f.half().numpy()  # float16 storage: the probe sets stay a few hundred MB


def mask_grid(masks: np.ndarray, side: int) -> np.ndarray:
    m = torch.from_numpy(masks[:, None].astype(np.float32))
    return (F.adaptive_avg_pool2d(m, side) >= 0.5).numpy()[:, 0]


def time_it(fn, reps: int) -> float:
    """Fastest of `reps` calls: on a shared, loaded CPU the minimum is the least contended estimate."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def timings(model: torch.nn.Module, threads: int) -> dict[str, float]:
    """ms/image of each expert's forward (effnet: features; OCR: the full graph + the patch tensor)."""
    out = {}
    single = OnnxFeatures(ocr_det_model(), [OCR_FEATURE.tensor], threads=threads)
    for side in (224, 256):
        for bs in (1, 16):
            x = torch.rand(bs, 3, side, side)
            with torch.inference_mode():
                t = time_it(lambda x=x: model.forward_features(x), reps=max(3, 48 // bs))
            out[f"effnet@{side} bs{bs} ms/img"] = round(1000 * t / bs, 2)
            xn = x.numpy()
            t = time_it(lambda xn=xn: single(xn), reps=max(3, 48 // bs))
            out[f"ocr_det@{side} bs{bs} ms/img"] = round(1000 * t / bs, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_experts.json"))
    ap.add_argument("--n-text", type=int, default=160)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--timings-only", action="store_true", help="skip 1-2, merge timings into --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                             "torch_threads": args.threads, "loadavg_1m_at_start": os.getloadavg()[0], "torch": torch.__version__, "onnxruntime": ort.__version__}}  # fmt: skip

    tmp = Path(tempfile.mkdtemp())
    weights = convert_effnet_lite0(tmp / "effnet_lite0.safetensors")
    model = effnet(weights)
    if args.timings_only:
        old = json.loads(args.out.read_text()) if args.out.is_file() else {}
        old.setdefault("timings_by_threads", {})[str(args.threads)] = timings(model, args.threads)
        old["timings_by_threads"][str(args.threads)]["machine"] = res["machine"]
        args.out.write_text(json.dumps(old, indent=1) + "\n")
        print(json.dumps(old["timings_by_threads"], indent=1))
        return

    # --- 1. semantic expert ---------------------------------------------------------------------
    info = timm.data.ImageNetInfo()
    import skimage.data

    top = {}
    for name, img in (("chelsea", skimage.data.chelsea()), ("coffee", skimage.data.coffee())):
        crop = D.random_crop(__import__("PIL.Image").Image.fromarray(img), 224, np.random.default_rng(0), 1.0)
        with torch.inference_mode():
            p = model(to_tensor(np.asarray(crop)[None], EFFNET_MEAN, EFFNET_STD)).softmax(-1)[0]
        v, i = p.topk(3)
        top[name] = [(info.index_to_description(int(k)), round(float(s), 3)) for s, k in zip(v, i)]
    res["effnet_top3"] = top
    stamps = [a for a in load_assets() if a.kind == "stamp"]
    counts: dict[str, int] = {}
    for a in stamps:
        counts[a.label] = counts.get(a.label, 0) + 1
    stamps = [a for a in stamps if counts[a.label] >= 12]
    splits = make_splits(0)
    images, labels = D.knn_set(splits, 224, tuple(stamps))
    labels = np.array([sorted({a.label for a in stamps}).index(a.label) for a in stamps])
    groups = [a.group for a in stamps]
    loo = {"n_images": len(stamps), "n_classes": int(len(set(labels.tolist())))}
    for tag, m in (("pretrained", model), ("random", effnet(None))):
        f = pooled(m, images)
        loo[tag] = loo_1nn(f, labels, groups, exclude_group=False)
        loo[tag + "_no_mirror_neighbour"] = loo_1nn(f, labels, groups, exclude_group=True)
    res["effnet_loo_1nn"] = loo
    print(json.dumps(res["effnet_top3"]), json.dumps(loo))

    # --- 2. OCR feature candidates ---------------------------------------------------------------
    side = 256
    tr_img, tr_glyph, tr_region = D.text_set(splits, args.n_text, seed=100, size=side)
    te_img, te_glyph, te_region = D.text_set(splits, args.n_text // 2, seed=0, size=side)
    runner = OnnxFeatures(ocr_det_model(), list(OCR_CANDIDATES), threads=args.threads)
    grid = side // 4
    targets = {
        "glyph": (mask_grid(tr_glyph, grid), mask_grid(te_glyph, grid)),
        "region": (mask_grid(tr_region, grid), mask_grid(te_region, grid)),
    }
    probe: dict[str, dict[str, float]] = {"glyph": {}, "region": {}}

    def record(name: str, a: np.ndarray, b: np.ndarray, kinds: tuple[str, ...] = ("glyph", "region")) -> None:
        for kind in kinds:
            mtr, mte = targets[kind]
            probe[kind][name] = round(text_probe_iou(a, mtr, b, mte), 4)
            print(kind, name, probe[kind][name], flush=True)

    for bgr in (True, False):
        feats = {k: ([], []) for k in OCR_CANDIDATES}
        for which, imgs in ((0, tr_img), (1, te_img)):
            for i in tqdm(range(0, len(imgs), 16), desc=f"ocr feats bgr={bgr}", leave=False):
                out = runner(ocr_input(imgs[i : i + 16], bgr))
                for k, v in out.items():
                    feats[k][which].append(resize_maps(v, grid))
        for k in OCR_CANDIDATES if bgr else ["p2o.Add.249"]:
            a, b = np.concatenate(feats[k][0]), np.concatenate(feats[k][1])
            record(f"{k} ({'BGR' if bgr else 'RGB'})", a, b, ("glyph", "region") if bgr else ("region",))
    rgb_tr = resize_maps(tr_img.transpose(0, 3, 1, 2).astype(np.float32) / 255, grid)
    rgb_te = resize_maps(te_img.transpose(0, 3, 1, 2).astype(np.float32) / 255, grid)
    record("raw RGB pixels", rgb_tr, rgb_te)

    def effnet_blocks(imgs: np.ndarray) -> np.ndarray:
        # last block output before the 1x1 head conv: 320ch at stride 32
        with torch.inference_mode():
            maps = [
                model.blocks(model.bn1(model.conv_stem(to_tensor(x[None], EFFNET_MEAN, EFFNET_STD))))
                for x in imgs
            ]
        return np.concatenate([resize_maps(m.numpy(), grid) for m in maps])

    record("effnet last block (stride 32, 320ch)", effnet_blocks(tr_img), effnet_blocks(te_img))
    res["ocr_probe_text_iou"] = {"images_train": len(tr_img), "images_test": len(te_img), "side": side,
                                 "grid": grid, "candidates": OCR_CANDIDATES, "iou": probe}  # fmt: skip
    print(json.dumps(probe, indent=1))

    res["timings"] = timings(model, args.threads)
    print(json.dumps(res["timings"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
