"""The small configurations tests train with.

The embedded defaults are the paper's recipe (CLIP ViT-B/16, pretrained, 30 + 10 epochs at
batch 8, the official augmentation): far too big for a test. SMALL is the scale the tests
were written at (the demo's shrunken recipe: timm's random test ViT, 8 + 3 epochs at batch
32, lr 2e-3, light augmentation that keeps digits digits); TINY shrinks the model further."""
from cladapter_core.params import load_params

SMALL = [
    "model.backbone=test_vit", "model.pretrained=false",
    "train.batch_size=32", "train.lr=0.002", "train.warmup_epochs=1", "train.grad_clip=1.0",
    "train.augment={hflip: false, vflip: false, brightness: 0.1, contrast: 0.1, color_p: 1.0, "
    "shift: 0.0625, scale: 0.1, rotate: 15, affine_p: 1.0}",
    "stage1.epochs=8", "stage2.epochs=3",
]
TINY = SMALL + [
    "model.backbone=vit_tiny_patch16_224",
    "model.backbone_kwargs={img_size: 16, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.rank=8", "model.num_centers=4", "train.batch_size=16",
    "stage1.epochs=2", "stage2.epochs=1", "train.warmup_epochs=1",
    "train.cache.views=null",
]


def small_params(*more):
    return load_params(None, SMALL + list(more))


def tiny_params(*more):
    return load_params(None, TINY + list(more))
