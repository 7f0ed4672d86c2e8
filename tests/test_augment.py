"""The paper's augmentation, exactly: the default values are the official ones, applied in
the official order with the official probabilities; the official best-epoch rule by option."""
from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms import v2

from cladapter_core.data.transforms import BrightnessContrast, _augmentations, augment_params, build_transform
from cladapter_core.params import defaults, load_params
from cladapter_core.training.resume import LoopState
from cladapter_core.training.trainer import Trainer

# The paper's code (albumentations): HorizontalFlip p 0.5, VerticalFlip p 0.5,
# RandomBrightnessContrast(0.10, 0.10) p 0.5, ShiftScaleRotate(0.05, 0.3, 180, black border) p 0.7.
OFFICIAL = {"hflip": True, "vflip": True, "brightness": 0.1, "contrast": 0.1, "color_p": 0.5,
            "shift": 0.05, "scale": 0.3, "rotate": 180, "affine_p": 0.7}


def test_the_default_augmentation_is_the_official_one_in_its_order():
    assert defaults()["train"]["augment"] == OFFICIAL
    assert load_params(None, [], preset="paper")["train"]["augment"] == OFFICIAL
    steps = _augmentations(augment_params(None))
    assert [type(s) for s in steps] == [v2.RandomHorizontalFlip, v2.RandomVerticalFlip,
                                        BrightnessContrast, v2.RandomApply]
    assert steps[0].p == steps[1].p == 0.5
    assert (steps[2].brightness, steps[2].contrast, steps[2].p) == (0.1, 0.1, 0.5)
    affine = steps[3]
    assert affine.p == 0.7 and len(affine.transforms) == 1
    a = affine.transforms[0]
    assert list(a.degrees) == [-180.0, 180.0] and a.translate == (0.05, 0.05)
    assert a.scale == (0.7, 1.3)  # the black border: test_the_affine_step_runs_...


def test_brightness_contrast_is_albumentations_arithmetic_with_its_probability():
    torch.manual_seed(0)
    x = torch.full((3, 8, 8), 0.5)
    always = BrightnessContrast(0.1, 0.1, 1.0)
    outs = torch.stack([always(x) for _ in range(400)])
    # one alpha and beta per call: a constant image stays constant; 0.5 * U(0.9, 1.1) + U(-0.1, 0.1)
    assert torch.all(outs.amax(dim=(1, 2, 3)) == outs.amin(dim=(1, 2, 3)))
    values = outs[:, 0, 0, 0]
    assert values.min() >= 0.35 - 1e-6 and values.max() <= 0.65 + 1e-6 and values.std() > 0.03
    assert BrightnessContrast(0.9, 0.9, 1.0)(torch.ones(1, 2, 2)).max() <= 1.0  # clipped to [0, 1]
    half = BrightnessContrast(0.1, 0.1, 0.5)
    changed = sum(not torch.equal(half(x), x) for _ in range(2000)) / 2000
    assert 0.45 < changed < 0.55


def test_the_affine_step_runs_with_probability_0_7_and_a_black_border():
    torch.manual_seed(0)
    config = {"input_size": [1, 16, 16], "mean": [0.0], "std": [1.0]}
    only_affine = dict(OFFICIAL, hflip=False, vflip=False, color_p=0.0)
    transform = build_transform(config, train=True, augment=only_affine)
    x = torch.ones(1, 16, 16)
    moved = [transform(x) for _ in range(1000)]
    share = sum(not torch.equal(m, x) for m in moved) / len(moved)
    assert 0.64 < share < 0.76  # p 0.7 (a rotation by ~0 degrees at scale ~1 is rare)
    assert min(float(m.min()) for m in moved) == 0.0  # the border is black, not reflected


def test_a_3d_clip_gets_one_brightness_draw_for_every_frame():
    config = {"input_size": [1, 4, 8, 8], "mean": [0.0], "std": [1.0]}
    transform = build_transform(config, train=True, augment=dict(
        OFFICIAL, hflip=False, vflip=False, color_p=1.0, affine_p=0.0))
    out = transform(torch.full((1, 4, 8, 8), 0.5))
    assert torch.allclose(out, out[:, :1].expand_as(out))


@pytest.mark.parametrize("ties,expected_best", [("earlier", 2), ("later", 3)])
def test_select_ties_keeps_the_earlier_or_the_later_epoch(ties, expected_best):
    """The official rule: a tie on the select metric goes to the later epoch."""
    model = torch.nn.Linear(1, 1)
    trainer = SimpleNamespace(state=LoopState(), model=model, t={"select_ties": ties})
    for epoch, value in enumerate([0.5, 0.8, 0.8]):
        trainer.state.history.append({"val_loss": 1.0})
        with torch.no_grad():
            model.weight.fill_(epoch)
        Trainer.select(trainer, epoch, value)
    assert trainer.state.best_epoch == expected_best
    assert float(trainer.state.best_state["weight"]) == expected_best - 1
