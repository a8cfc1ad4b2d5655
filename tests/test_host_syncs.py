"""No synchronizing host->device copies in a training step: RoPE coordinates and the batched
photometric half. No GPU needed: the "device" is the meta device or a fake CUDA device."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from eupe.data import finish_views
from eupe.data.photometric import JITTER_OPS
from eupe.models import create_model
from eupe.models.rope import DeviceGridRope, cache_rope_on_device
from eupe.teachers.timm_teacher import TimmTeacher

aten = torch.ops.aten
DEVICES = ("meta", "cuda")  # cuda: fake tensors, so it runs on CPU-only machines


class HostToDevice(TorchDispatchMode):
    """Records each copy from a CPU tensor to another device as (op name, non_blocking)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default:
            src, dst = args[0], torch.device(kwargs.get("device") or args[0].device)
        elif func is aten.copy_.default:
            src, dst = args[1], args[0].device
        else:
            return func(*args, **kwargs)
        if src.device.type == "cpu" and dst.type != "cpu":
            non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
            self.copies.append((func.__name__, bool(non_blocking)))
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_device(name: str) -> Iterator[torch.device]:
    """Run on `name`: the meta device, or CUDA faked by a FakeTensorMode."""
    fake = FakeTensorMode(allow_non_fake_inputs=True) if name == "cuda" else contextlib.nullcontext()
    with fake:
        yield torch.device(name)


@pytest.mark.parametrize("device", DEVICES)
def test_vit_forward_copies_rope_coordinates_once(device, one_torch_thread):
    # rope_rescale_coords: the train-time coordinate augmentation is on
    model = create_model("eupe_vitt16", depth=1, rope_rescale_coords=2)
    with on_device(device) as dev:
        model.to(dev)
        images = torch.empty(2, 3, 32, 48, device=dev)
        for train in (True, False):
            model.train(train)
            counts = []
            for _ in range(3):
                with HostToDevice() as seen:
                    model(images)
                counts.append(len(seen.copies))
            assert counts[1:] == [0, 0], (train, counts)  # the first call may copy the grid once


def test_cached_rope_equals_timm_bit_for_bit(one_torch_thread):
    timm_rope = RotaryEmbeddingDinoV3(
        dim=32, temperature=100, shift_coords=0.5, jitter_coords=1.5, rescale_coords=2.0
    )
    ours = cache_rope_on_device(copy.deepcopy(timm_rope))
    assert type(ours) is DeviceGridRope
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for train in (True, False):
            for rope in (timm_rope, ours):
                rope.to(dtype).train(train)
            for shape in ((4, 6), (4, 6), (5, 3)):
                torch.manual_seed(0)
                expected, expected_next = timm_rope.get_embed(shape=shape), torch.rand(4)
                torch.manual_seed(0)
                got, got_next = ours.get_embed(shape=shape), torch.rand(4)
                assert torch.equal(got, expected), (dtype, train, shape)
                assert torch.equal(got_next, expected_next)  # the same draws from the same generator


def test_student_forward_equals_timm_rope_bit_for_bit(one_torch_thread):
    model = create_model("eupe_vitt16", depth=1, rope_shift_coords=0.1, rope_rescale_coords=2).train()
    timm_model = copy.deepcopy(model)
    timm_model.backbone.rope.__class__ = RotaryEmbeddingDinoV3
    images = torch.rand(2, 3, 32, 48)
    for _ in range(2):
        torch.manual_seed(0)
        expected = timm_model(images).patches
        torch.manual_seed(0)
        assert torch.equal(model(images).patches, expected)


def test_every_dinov3_rope_is_cached_and_state_dicts_are_unchanged(one_torch_thread):
    model = create_model("eupe_vitt16", depth=1)
    assert type(model.backbone.rope) is DeviceGridRope
    teacher = TimmTeacher("vit_small_patch16_dinov3", pretrained=False, kwargs={"depth": 1})
    assert type(teacher.model.rope) is DeviceGridRope
    timm_model = copy.deepcopy(teacher.model)
    timm_model.rope.__class__ = RotaryEmbeddingDinoV3
    teacher.encode(torch.rand(1, 3, 32, 32))  # fills the cache, which must not reach the state dict
    ours, theirs = teacher.model.state_dict(), timm_model.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _params(b: int) -> list[dict]:
    """Every op on some view: the two jitter orders, blur sigmas of two kernel sizes, solarize."""
    orders = (list(JITTER_OPS), list(reversed(JITTER_OPS)))
    return [
        {
            "jitter": {
                "order": orders[i % 2],
                "brightness": 1.2,
                "contrast": 0.8,
                "saturation": 0.5,
                "hue": 0.05,
            },
            "blur_sigma": (0.0, 0.6, 1.7)[i % 3],
            "solarize": i % 2 == 1,
            "solarize_threshold": 0.5,
        }
        for i in range(b)
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_finish_views_copies_once_without_blocking(device, one_torch_thread):
    with on_device(device) as dev:
        views = torch.empty(6, 3, 16, 16, dtype=torch.uint8, device=dev)
        with HostToDevice() as seen:
            out = finish_views(views, _params(6))
    assert out.shape == (6, 3, 16, 16) and out.device.type == device
    assert len(seen.copies) == 1 and seen.copies[0][1], seen.copies  # one non_blocking copy
