"""The frozen encoder's feature cache: computes each image once, returns what the encoder would, keeps its budget."""

from __future__ import annotations

import torch

from capline.models import TimmEncoder
from capline.models.feature_cache import FrozenFeatureCache


class CountingEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = TimmEncoder("resnet18", img_size=32, crop_pct=1.0).eval()
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += images.shape[0]
        return self.encoder(images)


def test_each_image_is_encoded_once_and_features_equal_the_encoders():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    keys = [f"train/{i}" for i in range(6)]
    encoder, cache = CountingEncoder(), FrozenFeatureCache(max_gib=1.0)
    with torch.no_grad():
        expected = encoder.encoder(images)
        first = cache.features(keys[:4], images[:4], encoder)  # all new
        mixed = cache.features([keys[4], keys[1], keys[5], keys[0]], images[[4, 1, 5, 0]], encoder)  # 2 new
        again = cache.features(keys, images, encoder)  # all stored
    assert encoder.images_seen == 6 and len(cache) == 6 and (cache.hits, cache.misses) == (8, 6)
    torch.testing.assert_close(first, expected[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed, expected[[4, 1, 5, 0]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)
    cache.clear()
    assert len(cache) == 0 and cache.stored_bytes == 0


def test_images_past_the_memory_budget_are_computed_every_time():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    encoder = CountingEncoder()
    one = encoder.encoder(images[:1]).nbytes
    cache = FrozenFeatureCache(max_gib=2.5 * one / 2**30)  # room for two images' features
    with torch.no_grad():
        cache.features(["a", "b", "c", "d"], images, encoder)
        out = cache.features(["a", "b", "c", "d"], images, encoder)
    assert len(cache) == 2 and cache.stored_bytes == 2 * one
    assert encoder.images_seen == 4 + 2  # c and d again
    torch.testing.assert_close(out, encoder.encoder(images), rtol=1e-5, atol=1e-5)
