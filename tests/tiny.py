"""The tiny configuration tests train with: a 32-wide, one-block ViT on 16 px digits."""
from cladapter_core.params import load_params

TINY = [
    "model.backbone=vit_tiny_patch16_224",
    "model.backbone_kwargs={img_size: 16, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.rank=8", "model.num_centers=4", "train.batch_size=16",
    "stage1.epochs=2", "stage2.epochs=1", "train.warmup_epochs=1",
    "train.cache.views=null",
]


def tiny_params(*more):
    return load_params(None, TINY + list(more))
