"""Input and output models of the fal endpoints, one per schema family of the catalogue.

Families (catalog.toml ``schema``): ``dev`` (seed 001, FLUX.2 [dev] Standard), ``fast`` (Turbo and Flash: no
``num_inference_steps`` / ``acceleration``), ``lora`` (dev + ``loras``), ``pro`` (seed 000: no steps or
guidance, ``safety_tolerance``, jpeg/png), ``flex`` (pro + steps, guidance, prompt expansion), ``klein``
(like dev), ``trainer`` (the LoRA trainers: ``TrainerInput`` / ``TrainerOutput``, their own fields). Edit
endpoints add ``image_urls``. Defaults of steps, guidance, prompt expansion and output format
come from the endpoint's preset. Unknown fields are ignored, as fal does. Types are strict, as fal's are: a
number is not a boolean, ``true`` is not a seed, ``"2"`` is not a count. Seeds run from 0 to 2**63 - 1.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from fluxserve.catalog import EndpointSpec
from fluxserve.request import MAX_SEED

ImageSizeName = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]
EditImageSizeName = Literal[
    "auto", "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
Acceleration = Literal["none", "regular", "high"]
SafetyTolerance = Literal["1", "2", "3", "4", "5"]

FAMILIES = ("dev", "fast", "lora", "pro", "flex", "klein", "trainer")


class ImageSize(BaseModel):
    """A custom output size."""

    model_config = ConfigDict(extra="ignore")

    width: int = Field(512, ge=512, le=2048, strict=True, description="The width of the generated image.")
    height: int = Field(512, ge=512, le=2048, strict=True, description="The height of the generated image.")


class LoraWeight(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str = Field(description="URL of the LoRA weights (.safetensors): http(s):// or hf://owner/repo/file.")
    scale: float = Field(1.0, ge=0, le=4, strict=True, description="The scale of the LoRA weight, multiplying its effect.")

    @field_validator("path")
    @classmethod
    def _remote_only(cls, path: str) -> str:
        # A caller may not name files on the server's disk; operators use `fluxserve generate --lora PATH`.
        if not path.lower().startswith(("http://", "https://", "hf://")):
            raise ValueError("must be an http(s) URL or hf://owner/repo/path/to/file.safetensors")
        return path


class FalInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(
        min_length=1,
        description="The prompt to generate an image from.",
        examples=["A cinematic portrait of a weathered sailor with white beard, golden hour lighting"],
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, strict=True,
        description="The seed to use for the generation. If not provided, a random seed will be used.",
    )
    sync_mode: bool = Field(
        False,
        strict=True,
        description="If `True`, the media will be returned as a data URI and the output data won't be available "
        "in the request history.",
    )
    enable_safety_checker: bool = Field(True, strict=True, description="If set to true, the safety checker will be enabled.")


def _coerce_tolerance(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ImageFile(BaseModel):
    url: str = Field(description="The URL of the image (a data URI with sync_mode).")
    width: int | None = None
    height: int | None = None
    content_type: str | None = Field(None, examples=["image/png"])


class Timings(BaseModel):
    model_config = ConfigDict(extra="allow")


class DevOutput(BaseModel):
    images: list[ImageFile] = Field(description="The generated images")
    timings: dict[str, float] = Field(default_factory=dict)
    seed: int = Field(
        description="Seed of the generated Image. It will be the same value of the one passed in the input or the "
        "randomly generated that was used in case none was passed."
    )
    has_nsfw_concepts: list[bool] = Field(description="Whether the generated images contain NSFW concepts.")
    prompt: str = Field(description="The prompt used for generating the image.")


class ProOutput(BaseModel):
    images: list[ImageFile] = Field(description="The generated images.")
    seed: int = Field(description="The seed used for the generation.")
    has_nsfw_concepts: list[bool] | None = Field(
        None, description="Present only when the safety checker blocked an image (it comes back black): "
        "whether each image contains NSFW concepts.")


class TrainerInput(BaseModel):
    """fal's FLUX.2 trainer input; ``seed`` and ``resolution`` are fluxserve's own (fal's clients may leave them
    out)."""

    model_config = ConfigDict(extra="ignore")

    image_data_url: str = Field(
        min_length=1, strict=True,
        description="URL to zip archive with images of a consistent style. Try to use at least 10 images, although "
        "more is better. The zip can also contain a text file for each image: the text file should have the same "
        "name as the image file it corresponds to (e.g. photo.jpg and photo.txt). For edit training, images come "
        "in pairs ROOT_start.EXT (the input) and ROOT_end.EXT (the target), captioned by ROOT.txt; up to three more "
        "inputs per pair are named ROOT_start2.EXT, ROOT_start3.EXT and ROOT_start4.EXT.",
    )
    steps: int = Field(1000, ge=1, le=10_000, strict=True, description="Total number of training steps.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Learning rate applied to trainable parameters.")
    default_caption: str | None = Field(
        None, strict=True, description="Default caption to use when caption files are missing. If None, missing "
        "captions will cause an error.")
    output_lora_format: Literal["fal", "comfy"] = Field(
        "fal", description="Dictates the naming scheme for the output weights: fal (diffusers keys) or comfy.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True,
                             description="Random seed of the training run (0 when not given): the same data and "
                             "seed train the same LoRA.")
    resolution: int = Field(1024, ge=64, le=2048, strict=True,
                            description="The side images are trained at, keeping their shape.")


class File(BaseModel):
    url: str = Field(description="The URL where the file can be downloaded from.")
    content_type: str | None = Field(None, description="The mime type of the file.")
    file_name: str | None = Field(None, description="The name of the file.")
    file_size: int | None = Field(None, description="The size of the file in bytes.")


class TrainerOutput(BaseModel):
    diffusers_lora_file: File = Field(description="URL to the trained diffusers LoRA weights.")
    config_file: File = Field(description="URL to the training configuration file.")


def output_model(spec: EndpointSpec) -> type[BaseModel]:
    if spec.is_training:
        return TrainerOutput
    return ProOutput if spec.schema in ("pro", "flex") else DevOutput


def _fields(spec: EndpointSpec) -> dict[str, Any]:
    """The fields of ``spec``'s input model beyond the common ones, as ``create_model`` wants them."""
    family = spec.schema
    if family not in FAMILIES:
        raise ValueError(f"endpoint {spec.id!r}: unknown schema family {family!r}; known: {', '.join(FAMILIES)}")
    fields: dict[str, Any] = {}
    size_type: Any = EditImageSizeName if spec.is_edit else ImageSizeName
    size_default = "auto" if spec.is_edit else "landscape_4_3"
    size_note = " With `auto` (the default for edits) the size of the first input image is used." if spec.is_edit else ""
    fields["image_size"] = (
        ImageSize | size_type | None,
        Field(
            size_default,
            description="The size of the image to generate. The width and height must be between 512 and 2048 "
            "pixels." + size_note,
        ),
    )
    formats: Any = Literal["jpeg", "png"] if family in ("pro", "flex") else Literal["jpeg", "png", "webp"]
    fields["output_format"] = (formats, Field(spec.output_format, description="The format of the generated image."))
    if family in ("pro", "flex"):
        fields["safety_tolerance"] = (
            SafetyTolerance,
            Field(
                "2",
                description="The safety tolerance level for the generated image. 1 being the most strict and 5 "
                "being the most permissive.",
            ),
        )
    else:
        fields["num_images"] = (int, Field(1, ge=1, le=4, strict=True, description="The number of images to generate."))
    if family != "pro":
        fields["guidance_scale"] = (
            float,
            Field(
                spec.guidance,
                ge=0,
                le=20,
                strict=True,
                description="Guidance Scale is a measure of how close you want the model to stick to your prompt "
                "when looking for a related image to show you.",
            ),
        )
        fields["enable_prompt_expansion"] = (
            bool,
            Field(spec.expand_prompt, strict=True, description="If set to true, the prompt will be expanded for better results."),
        )
    if family in ("dev", "lora", "flex", "klein"):
        fields["num_inference_steps"] = (
            int,
            Field(spec.steps, ge=4, le=50, strict=True, description="The number of inference steps to perform."),
        )
    if family in ("dev", "lora", "klein"):
        fields["acceleration"] = (
            Acceleration,
            Field("regular", description="The acceleration level to use for the image generation."),
        )
    if family == "lora":
        fields["loras"] = (
            list[LoraWeight],
            Field(default_factory=list, max_length=spec.max_loras,
                  description=f"The LoRAs to use for the image generation: at most {spec.max_loras}."),
        )
    if spec.is_edit:
        fields["image_urls"] = (
            list[str],
            Field(
                min_length=1,
                max_length=spec.max_references,
                description=f"The URLs of the images for editing: up to {spec.max_references} reference images "
                f"(http(s) URLs or data URIs), at most {spec.max_input_megapixels:g} MP in total.",
            ),
        )
    return fields


_MODELS: dict[int, tuple[EndpointSpec, type[FalInput]]] = {}


def _build_input_model(spec: EndpointSpec) -> type[FalInput]:
    name = "".join(part.capitalize() for part in spec.id.replace("-", "/").replace(".", "/").split("/")) + "Input"
    validators = {}
    if spec.schema in ("pro", "flex"):
        validators["_tolerance"] = field_validator("safety_tolerance", mode="before")(_coerce_tolerance)
    model = create_model(name, __base__=FalInput, __validators__=validators, **_fields(spec))
    model.__doc__ = spec.title
    return model


def input_model(spec: EndpointSpec) -> type[BaseModel]:
    """The pydantic input model of one catalogue endpoint (cached per spec object)."""
    if spec.is_training:
        return TrainerInput
    cached = _MODELS.get(id(spec))
    if cached is None or cached[0] is not spec:
        cached = _MODELS[id(spec)] = (spec, _build_input_model(spec))
    return cached[1]
