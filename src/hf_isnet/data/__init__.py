"""Data sets with segmentation masks, as Hugging Face ``datasets``.

Every loader returns data with the columns ``image``, ``mask`` (binary, foreground = non-zero) and
``label`` (``ClassLabel``). The synthetic shortcut benchmarks return a ``DatasetDict`` with the splits
``train``, ``test_iid`` (same bias as training), ``test_ood`` (no bias) and ``test_deceiving`` (the bias
of another class), built from data installed from package registries and cached on disk; nothing is
downloaded.

- :func:`load_biased_mnist`: real MNIST digits, a bright patch in the border whose position encodes the
  class.
- :func:`load_photo_composites`: Fashion-MNIST objects on natural photos, the class number written in
  the background.
- :func:`load_image_mask_folder`, :func:`load_stanford_dogs`, :func:`load_xray_folder`: folders the user
  provides.
"""

from hf_isnet.data.biased_mnist import load_biased_mnist
from hf_isnet.data.folders import load_image_mask_folder, load_stanford_dogs, load_xray_folder
from hf_isnet.data.photo_composites import load_photo_composites

__all__ = [
    "load_biased_mnist",
    "load_image_mask_folder",
    "load_photo_composites",
    "load_stanford_dogs",
    "load_xray_folder",
]
