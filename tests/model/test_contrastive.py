"""Contrastive tower pretraining: the sigmoid loss and the towers learn which caption is whose."""

import math

import torch
from conftest import fit, scene_pixels

from slmctl.data.shapes import Shape, ShapeCaptions, caption
from slmctl.model.contrastive import ContrastiveTowers, sigmoid_loss
from slmctl.model.vision import VisionConfig, build_tower


def test_the_sigmoid_loss_is_low_for_matching_pairs_and_high_for_swapped_ones():
    embeddings = torch.nn.functional.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-5.0)
    matched = sigmoid_loss(embeddings, embeddings, scale, bias)
    swapped = sigmoid_loss(embeddings, embeddings.roll(1, dims=0), scale, bias)
    assert matched < swapped
    by_hand = -sum(torch.nn.functional.logsigmoid((1 if i == j else -1) * (10 * embeddings[i] @ embeddings[j] - 5))
                   for i in range(6) for j in range(6)) / 6
    assert torch.isclose(matched, by_hand, atol=1e-5)


def test_captions_count_and_name_the_shapes_left_to_right():
    shapes = [Shape("square", "blue", 50, 10, 5), Shape("circle", "red", 10, 10, 5), Shape("circle", "red", 30, 10, 5)]
    assert caption(shapes) == "three shapes: two red circles, a blue square"
    assert caption([Shape("triangle", "orange", 5, 5, 2)]) == "one shape: an orange triangle"


def test_on_a_tiny_batch_the_loss_falls_and_matching_pairs_score_highest():
    torch.manual_seed(0)
    tower = build_tower(VisionConfig(tower="vit", image_size=32, patch_size=8, width=32, layers=2, heads=2))
    data = ShapeCaptions(seed=0, split="train", n=8)
    words = sorted({w for i in range(8) for w in data[i][1].replace(",", "").replace(":", "").split()})
    vocab = {w: k + 1 for k, w in enumerate(words)}
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor([vocab[w] for w in data[i][1].replace(",", "").replace(":", "").split()])
                                           for i in range(8)], batch_first=True)
    mask = (ids != 0).long()
    pixels = scene_pixels([data[i][0] for i in range(8)])
    towers = ContrastiveTowers(tower, vocab_size=len(vocab) + 1, dim=32)
    first, last = fit(towers, pixels, ids, mask)
    assert last < 0.5 * first
    with torch.no_grad():
        logits = towers.similarity(pixels, ids, mask)
    distinct = [i for i in range(8) if sum(data[j][1] == data[i][1] for j in range(8)) == 1]
    assert all(logits[i].argmax().item() == i for i in distinct)  # each image's own caption scores highest
    assert logits.diagonal().mean() > logits[~torch.eye(8, dtype=torch.bool)].mean()
