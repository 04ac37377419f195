"""mriflow.models.label_decoder: the label decoder built from an autoencoder's image decoder."""

from __future__ import annotations

import torch

from conftest import tiny_config
from mriflow.data.labels import TISSUE_CLASSES
from mriflow.models.autoencoder import Autoencoder
from mriflow.models.label_decoder import LabelDecoder


def test_the_label_decoder_starts_from_the_image_decoder():
    """Before training, each class's logits are the image decoder's output (pre-activation), voxel for voxel: the
    output convolution is copied once per class in the channel order depth-to-space reads."""
    torch.manual_seed(0)
    autoencoder = tiny_config().model
    autoencoder = Autoencoder(autoencoder).eval()
    decoder = LabelDecoder.from_autoencoder(autoencoder).eval()
    z = torch.randn(2, 2, 4, 5, 4)
    with torch.no_grad():
        image = autoencoder.decode(z) * 2 - 1  # the decoder's raw output
        logits = decoder(z)
    assert logits.shape == (2, len(TISSUE_CLASSES), 16, 20, 16)
    for c in range(len(TISSUE_CLASSES)):
        torch.testing.assert_close(logits[:, c], image[:, 0], rtol=1e-4, atol=1e-5)
