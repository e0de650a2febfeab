"""What a training dataset may hold: the limits its archive, files and images are checked against, by their
headers when a training job is submitted and again while the worker reads them. ``DatasetLimits.from_settings``
reads the operator's (``FLUXSERVE_DATASET_*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxserve import inputs

MIB = 1024**2


@dataclass(frozen=True)
class DatasetLimits:
    """``min_side``: the trainer resizes images to its training resolution (1024 by default); a side below 256 px
    would be upscaled at least 4x, and 256 px is 16 image tokens, the least that still carries a composition.
    Images beyond ``max_side`` are downscaled (aspect kept) when decoded, and ``max_total_megapixels`` counts
    them as kept: what a 2048 px training resolution uses is never lost."""

    max_files: int = 1000  # files in the archive or folder (skipped ones included, folders not)
    max_archive_bytes: int = 1024 * MIB  # the zip itself (a download stops there)
    max_total_bytes: int = 4096 * MIB  # all images and captions, uncompressed
    max_entry_bytes: int = 64 * MIB  # one image, uncompressed
    max_caption_bytes: int = 64 * 1024  # one caption (FLUX.2 reads at most 512 tokens of it)
    max_ratio: float = 100.0  # uncompressed / compressed, per entry and for the archive
    min_side: int = 256  # pixels, each side of each image
    max_megapixels: float = inputs.DEFAULT_MAX_INPUT_MEGAPIXELS  # one image, from its header
    max_side: int = 2048  # larger images are downscaled to this long side
    max_total_megapixels: float = 1024.0  # all images as kept, from their headers

    @classmethod
    def from_settings(cls, settings: Any) -> DatasetLimits:
        return cls(
            max_files=int(settings.dataset_max_files),
            max_archive_bytes=int(float(settings.dataset_max_archive_mb) * MIB),
            max_total_bytes=int(float(settings.dataset_max_total_mb) * MIB),
            max_entry_bytes=int(float(settings.dataset_max_file_mb) * MIB),
            max_caption_bytes=int(float(settings.dataset_max_caption_kb) * 1024),
            max_ratio=float(settings.dataset_max_ratio),
            max_megapixels=float(settings.dataset_max_image_megapixels),
            max_side=int(settings.dataset_max_side),
            max_total_megapixels=float(settings.dataset_max_total_megapixels),
        )
