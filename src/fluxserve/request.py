"""The internal contract: one canonical request in, one canonical result out.

Every dialect (fal, OpenAI, Replicate, the CLI) translates its own input into a ``GenerationRequest``;
the job store keeps it as JSON; a worker hands it to the engine, which returns a ``GenerationResult``;
the dialect translates that back. Nothing here knows about HTTP or GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Acceleration = Literal["none", "regular", "high"]
OutputFormat = Literal["png", "jpeg", "webp", "avif", "gif"]
# Seeds go to torch generators, which take 64-bit values: 0 to 2**63 - 1 fits every client and database.
MAX_SEED = 2**63 - 1

CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
    "gif": "image/gif",
}


class LoraSpec(BaseModel):
    """A LoRA to apply for one request: a local path, an http(s) URL or ``hf://owner/repo/file``."""

    model_config = ConfigDict(extra="forbid")

    path: str
    scale: float = 1.0


class GenerationRequest(BaseModel):
    """What to generate. Sizes are already resolved by ``fluxserve.sizes`` (multiples of 16) or left
    ``None`` to take the first reference's size (or the model default without references). Numbers are finite:
    NaN and infinity (which JSON parsers accept) are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(description="catalogue model key, e.g. 'dev' or 'klein-4b'")
    prompt: str
    image_urls: list[str] = Field(default_factory=list, description="reference images: URLs, data URIs, paths")
    width: int | None = None
    height: int | None = None
    min_side: int = Field(64, ge=64, le=2048, description="the shortest side an auto size may have")
    num_images: int = Field(1, ge=1, le=4)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int = Field(28, ge=1, le=100)
    guidance: float = 2.5
    sigmas: list[float] | None = None
    loras: list[LoraSpec] = Field(default_factory=list)
    expand_prompt: bool = False
    safety_checker: bool = True
    safety_tolerance: int = Field(2, ge=1, le=5)
    fail_if_blocked: bool = Field(False, description="an image the safety checker blocks fails the job "
                                  "(content_policy_violation) instead of coming back black and flagged")
    acceleration: Acceleration = "regular"
    output_format: OutputFormat = "png"
    output_quality: int | None = Field(None, ge=0, le=100)
    partial_images: int = Field(0, ge=0, le=3, description="preview images to report during denoising")


class TrainingRequest(BaseModel):
    """What to train: a LoRA for ``model`` on the zip at ``image_data_url`` (an http(s) URL, checked before the job
    is queued) or, for a data URI or one of this server's files, at ``dataset_key`` in storage. A job holds either this or a ``GenerationRequest``; ``kind`` tells them apart."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["train"] = "train"
    model: str = Field(description="catalogue model key of a trainable model, e.g. 'dev' or 'klein-4b-base'")
    image_data_url: str
    dataset_key: str | None = Field(None, description="the archive in this server's storage (an upload, or a data "
                                    "URI stored when the job was queued): read from there instead of the URL")
    edit: bool = Field(False, description="the zip holds ROOT_start / ROOT_end pairs: an image-to-image LoRA")
    steps: int = Field(1000, ge=1, le=10_000)
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    rank: int = Field(16, ge=1, le=256)
    default_caption: str | None = None
    output_lora_format: Literal["fal", "comfy"] = "fal"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    resolution: int = Field(1024, ge=64, le=2048, description="the side images are trained at, shape kept")


@dataclass
class GeneratedImage:
    data: bytes
    width: int
    height: int
    content_type: str
    nsfw: bool = False


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    seed: int
    prompt: str
    timings: dict[str, float] = field(default_factory=dict)
    reference_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each reference as loaded
    served_by: str = "local"  # "local" (this server's GPUs) or the upstream provider the gateway used

    @property
    def has_nsfw_concepts(self) -> list[bool]:
        return [image.nsfw for image in self.images]


@dataclass
class Progress:
    """Reported after every denoising step; ``preview`` is an encoded image when one was asked for."""

    step: int
    total: int
    message: str = ""
    preview: bytes | None = None


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


class GenerationCancelled(Exception):
    """Raised by the engine between denoising steps when ``should_cancel`` answers True."""


class InputError(ValueError):
    """A request the engine cannot run because of one of its fields; dialects turn it into a 4xx."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message
