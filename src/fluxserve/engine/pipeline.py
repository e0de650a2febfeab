"""The engine: one ``GenerationRequest`` in, one ``GenerationResult`` out.

Stages, each timed: text encoding (``encode_prompt``, after the optional prompt expansion), denoising (the
diffusers pipeline with ``prompt_embeds`` and ``output_type="latent"``, a callback per step for progress,
previews and cancellation), decoding (the VAE, with the pipeline's own latent post-processing), safety and
encoding. Pipelines stay resident per model key once loaded.

The first four are the GPU part (``Engine.render``), on the engine's own thread; encoding the images into
files (``Engine.encode_images``) runs on a pool of its own (``Settings.encode_threads``), so the engine is free
for the next request while the CPU encodes the last one. ``Engine.generate`` does both, one after the other.

Timings (seconds, in ``GenerationResult.timings``): ``text_encoding``, ``denoising``, ``decoding`` and ``safety``
are those stages on the engine's thread; ``encoding`` is the wall time from handing the images to the encoding
pool to the last one encoded (all of a request's images encode in parallel); ``inference`` is the request's
time on the engine: its whole GPU part (loading references and, on first use, the model included) plus its
encoding, not counting any time the decoded images waited between the two.

With the setting ``random_weights`` the engine builds each model's architecture with seeded random weights
(``random_weights.build_for_model``) instead of loading weights, and runs no safety checker (``safety_off``).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from PIL import Image

from fluxserve.catalog import Catalog, ModelSpec
from fluxserve.config import Settings
from fluxserve.engine import accel, lora, memory, plan, random_weights, safety
from fluxserve.engine import decode as decoding
from fluxserve.engine.demo import demo_lora_path, ensure_demo_weights
from fluxserve.engine.encode import encode_image, plain_png
from fluxserve.engine.placement import Placement
from fluxserve.engine.prompts import MAX_NEW_TOKENS, expand_prompt
from fluxserve.engine.text_encoder import encoding_only
from fluxserve.engine.weights import load_placed_pipeline, resolve_weights
from fluxserve.inputs import load_references
from fluxserve.request import (
    CONTENT_TYPES,
    CancelCheck,
    GeneratedImage,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    InputError,
    Progress,
    ProgressCallback,
)
from fluxserve.sizes import MODEL_MAX_SIDE, MODEL_MIN_SIDE, auto_size, round16

log = logging.getLogger(__name__)

DEFAULT_SIZE = (1024, 768)
MAX_SEED = 2**31 - 1
DEMO_EXPANSION_TOKENS = 24  # the demo text encoders write noise; keep their expansions short and fast
TIMING_KEYS = ("text_encoding", "denoising", "decoding", "safety", "encoding", "inference")


@dataclass
class Rendered:
    """A request's images as pixels, after the GPU part and before encoding: what ``Engine.render`` returns and
    ``Engine.encode_images`` turns into files. ``gpu_seconds``: the GPU part's whole time on the engine's
    thread."""

    images: list[Image.Image]
    nsfw: list[bool]
    seed: int
    prompt: str
    metadata: dict  # the generation parameters embedded in every file
    output_format: str
    output_quality: int | None
    reference_sizes: list[tuple[int, int]]
    timings: dict[str, float]  # text_encoding, denoising, decoding, safety
    gpu_seconds: float


@dataclass
class LoadedModel:
    key: str
    spec: ModelSpec
    pipe: object
    path: str
    placement: Placement
    load_seconds: float


class Engine:
    """Runs generation requests on one device. Thread-safe loading; one request's GPU part at a time per
    instance, always on the engine's own thread, whichever thread calls ``render`` or ``generate`` (CUDA graphs
    are recorded per thread, so one thread keeps one set of them per engine however many workers share it);
    image encoding on the engine's encoding pool, alongside the next request's GPU part."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        # Compiled kernels and graphs persist under the data directory, so a restart does not compile again.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir / "torchinductor"))
        plan.candidates(settings.transformer_placement, settings.text_encoder_placement)  # a clear error early
        self.device = _pick_device(settings.device)
        if settings.random_weights:  # refused here, before anything is built, where it cannot run
            random_weights.check_setting(settings.random_weights, self.device, settings.demo)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # before anything is planned or allocated: every plan on this device sees the capped memory
        self.memory_cap = memory.apply_memory_cap(self.device, settings.gpu_memory_cap)
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._safety = None
        self._safety_lock = threading.Lock()
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.device}")
        self._encoder = ThreadPoolExecutor(max_workers=encode_threads(settings),
                                           thread_name_prefix=f"encode-{self.device}")

    # ---- models -----------------------------------------------------------------------------------------
    def load(self, model_key: str) -> None:
        """Make ``model_key`` resident (it loads lazily on first use otherwise). Thread-safe."""
        self._model(model_key)

    def loaded(self) -> list[str]:
        return list(self._models)

    def _spec(self, model_key: str) -> ModelSpec:
        try:
            return self.catalog.models[model_key]
        except KeyError:
            raise InputError("model", f"unknown model {model_key!r}; known: {', '.join(self.catalog.models)}") \
                from None

    def _model(self, model_key: str) -> LoadedModel:
        loaded = self._models.get(model_key)
        if loaded is not None:
            return loaded
        spec = self._spec(model_key)
        with self._lock:
            lock = self._model_locks.setdefault(model_key, threading.Lock())
        with lock:
            loaded = self._models.get(model_key)
            if loaded is None:
                loaded = self._load(spec)
                self._models[model_key] = loaded
        return loaded

    def _load(self, spec: ModelSpec) -> LoadedModel:
        start = time.perf_counter()
        size = self.settings.random_weights
        if size:
            path = f"random weights ({size} {random_weights.architecture_key(spec.key)} architecture, seed 0)"
            pipe, placement = random_weights.build_for_model(spec.key, size, self.device, self.dtype,
                                                             self.requested_placement(), distilled=spec.distilled)
        else:
            path = resolve_weights(spec, self.settings)
            pipe, placement = load_placed_pipeline(spec, path, self.device, self.dtype, self.requested_placement(),
                                                   demo=self.settings.demo)
        accel.apply_acceleration(pipe, "regular", self.device)
        seconds = time.perf_counter() - start
        log.info("loaded %s from %s in %.1fs (%s)", spec.key, path, seconds, placement.as_dict())
        return LoadedModel(spec.key, spec, pipe, str(path), placement, seconds)

    @property
    def safety_off(self) -> str | None:
        """Why this engine runs no safety checker whatever a request asks (random weights), or None."""
        return random_weights.SAFETY_OFF if self.settings.random_weights else None

    def requested_placement(self) -> dict[str, str]:
        return {"transformer": self.settings.transformer_placement,
                "text_encoder": self.settings.text_encoder_placement}

    def placement(self) -> dict:
        """What is loaded where, in which precision, and the device's memory (as planned from: under the cap,
        which is reported when one was asked for)."""
        models = {}
        for key, loaded in self._models.items():
            info = loaded.placement.as_dict()
            info.update(weights=loaded.path, pipeline=loaded.spec.pipeline, load_seconds=round(loaded.load_seconds, 2))
            state = accel.acceleration_state(loaded.pipe)
            if state is not None:
                info["acceleration"] = state
            models[key] = info
        device_memory: dict = memory.memory_report(self.device)
        if self.memory_cap.requested_bytes:
            device_memory["cap"] = self.memory_cap.as_dict()
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "demo": self.settings.demo, "random_weights": self.settings.random_weights or None,
                "safety_checker": self.safety_off or "on (requests may turn it off)",
                "requested": self.requested_placement(), "models": models, "memory": device_memory}

    # ---- generation -------------------------------------------------------------------------------------
    def generate(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        """Run ``request``: ``render`` then ``encode_images``; the encoded images."""
        return self.encode_images(self.render(request, on_progress, should_cancel))

    def render(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> Rendered:
        """The GPU part of ``request`` (text encoding, denoising, decoding, safety) on the engine's thread, whichever
        thread calls it; progress and cancel checks are called from that thread. The images are not encoded yet:
        the engine takes its next request as soon as this returns."""
        return self._runner.submit(self._render, request, on_progress, should_cancel).result()

    def encode_images(self, rendered: Rendered) -> GenerationResult:
        """Encode ``rendered``'s images into files on the encoding pool, one task per image, off the engine's
        thread (the caller waits for them); the result with every timing (see module doc)."""
        started = time.perf_counter()
        tasks = [self._encoder.submit(encode_image, image, rendered.output_format, rendered.output_quality,
                                      rendered.metadata) for image in rendered.images]
        files = [task.result() for task in tasks]
        encoding = time.perf_counter() - started
        timings = {**dict.fromkeys(TIMING_KEYS, 0.0), **rendered.timings, "encoding": encoding,
                   "inference": rendered.gpu_seconds + encoding}
        outputs = [
            GeneratedImage(data=data, width=image.width, height=image.height,
                           content_type=CONTENT_TYPES[rendered.output_format], nsfw=flagged)
            for data, image, flagged in zip(files, rendered.images, rendered.nsfw, strict=True)
        ]
        return GenerationResult(images=outputs, seed=rendered.seed, prompt=rendered.prompt, timings=timings,
                                reference_sizes=rendered.reference_sizes)

    def train(self, model_key: str, examples: list, *, on_note: Callable[[str], None] | None = None,
              **options) -> dict:
        """Train a LoRA for ``model_key`` on ``examples`` (``fluxserve.training.trainer.train_lora``'s options:
        steps, learning_rate, rank, seed, resolution, on_progress, should_cancel) on the engine's thread, with
        the model the engine serves; the LoRA's weights in diffusers' format. The job has the GPU to itself (no
        request runs meanwhile); its memory plan (``plan.plan_training``) is checked before the first step and
        told to ``on_note``, and moves the text encoder to host memory for the steps where they need the room."""
        from fluxserve.training.trainer import train_lora

        def work() -> dict:
            spec = self._spec(model_key)
            if not spec.trainable:
                trainable = ", ".join(key for key, model in self.catalog.models.items() if model.trainable)
                raise InputError("model", f"{model_key} cannot be trained (a distilled model); train one of: "
                                 f"{trainable}")
            loaded = self._model(model_key)
            references = max((len(getattr(example, "starts", [])) for example in examples), default=0)
            training = self._training_plan(loaded, options.get("resolution", 1024), options.get("rank", 16),
                                           references)
            if on_note is not None:
                on_note(f"training placement: {training.describe()} (about {training.needed_bytes / plan.GIB:.1f} "
                        f"GiB of {training.free_bytes / plan.GIB:.1f})" if training else
                        f"training placement: everything in host memory on {self.device}")
            offload = training is not None and training.offload_text_encoder
            return train_lora(loaded.pipe, examples, offload_text_encoder=offload, **options)

        return self._runner.submit(work).result()

    def _training_plan(self, loaded: LoadedModel, resolution: int, rank: int,
                       references: int) -> plan.TrainingPlan | None:
        """The training plan of a loaded model on this GPU, from the bytes its components hold there now and the
        memory left (None off CUDA: no plan to make)."""
        from fluxserve.engine.placement import device_bytes
        from fluxserve.training.trainer import step_bytes

        if self.device.type != "cuda":
            return None
        pipe = loaded.pipe
        held = {name: device_bytes(getattr(pipe, name), self.device) for name in ("transformer", "text_encoder",
                                                                                   "vae")}
        sizes = {**held, "transformer_fp8": held["transformer"], "text_encoder_fp8": held["text_encoder"]}
        free, total = memory.free_gpu_bytes(self.device)
        return plan.plan_training(sizes, transformer=loaded.placement.transformer,
                                  text_encoder=loaded.placement.text_encoder,
                                  step_bytes=step_bytes(pipe.transformer, resolution=resolution, rank=rank,
                                                        references=references),
                                  free_bytes=free + sum(held.values()), total_bytes=total)

    def _render(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
    ) -> Rendered:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        spec = self._spec(request.model)
        references = self._references(request)
        out_width, out_height = self._output_size(request, references)
        gen_width, gen_height = round16(out_width), round16(out_height)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        if _cancelled(should_cancel):
            raise GenerationCancelled("cancelled before start")

        loaded = self._model(spec.key)
        pipe = loaded.pipe
        accel.apply_acceleration(pipe, request.acceleration, self.device)
        with self._loras(pipe, request):
            # 1. text encoding (with the optional prompt expansion)
            t0 = time.perf_counter()
            prompt = request.prompt
            if request.expand_prompt:
                prompt = self._expand(loaded, prompt, references, seed)
            prompt_embeds, negative_embeds = self._encode(pipe, prompt, request)
            timings["text_encoding"] = time.perf_counter() - t0

            # 2. denoising
            t0 = time.perf_counter()
            latents = self._denoise(pipe, request, references, prompt_embeds, negative_embeds, seed,
                                    gen_width, gen_height, on_progress, should_cancel)
            timings["denoising"] = time.perf_counter() - t0

            # 3. decoding
            t0 = time.perf_counter()
            vae_input = decoding.vae_latents(pipe, latents, gen_height, gen_width)
            images = decoding.decode(pipe, vae_input)
            if (gen_width, gen_height) != (out_width, out_height):
                images = [image.resize((out_width, out_height), Image.Resampling.LANCZOS) for image in images]
            timings["decoding"] = time.perf_counter() - t0

        # 4. safety
        t0 = time.perf_counter()
        flags = [False] * len(images)
        if request.safety_checker and self.safety_off is None:
            flags = self._check_safety(images, request.safety_tolerance)
            images = [safety.blackout(image) if flagged else image for image, flagged in zip(images, flags)]
        timings["safety"] = time.perf_counter() - t0

        # 5. encoding: Engine.encode_images, on the encoding pool
        metadata = {
            "prompt": prompt, "seed": seed, "model": spec.key, "model_title": spec.title,
            "steps": request.steps, "guidance": request.guidance, "width": out_width, "height": out_height,
        }
        if request.loras:
            metadata["loras"] = [{"path": public_url(lora.path), "scale": lora.scale} for lora in request.loras]
        return Rendered(images=images, nsfw=flags, seed=seed, prompt=prompt, metadata=metadata,
                        output_format=request.output_format, output_quality=request.output_quality,
                        reference_sizes=[reference.size for reference in references], timings=timings,
                        gpu_seconds=time.perf_counter() - started)

    # ---- stages -----------------------------------------------------------------------------------------
    def _references(self, request: GenerationRequest) -> list[Image.Image]:
        if not request.image_urls:
            return []
        limits = [e for e in self.catalog.endpoints.values() if e.model == request.model and e.is_edit]
        max_refs = max((e.max_references for e in limits), default=10) or 10
        max_mp = max((e.max_input_megapixels for e in limits), default=14.0)
        return load_references(request.image_urls, max_references=max_refs, max_input_megapixels=max_mp)

    @staticmethod
    def _output_size(request: GenerationRequest, references: list[Image.Image]) -> tuple[int, int]:
        if (request.width is None) != (request.height is None):
            missing = "height" if request.height is None else "width"
            raise InputError(missing, "give both width and height, or neither")
        if request.width is not None:
            width, height = request.width, request.height
            for name, side in (("width", width), ("height", height)):
                if not MODEL_MIN_SIDE <= side <= MODEL_MAX_SIDE:
                    raise InputError(name, f"{side} is outside {MODEL_MIN_SIDE}-{MODEL_MAX_SIDE} pixels")
            return width, height
        if not references:
            return DEFAULT_SIZE
        return auto_size(*references[0].size, request.min_side)

    def _expand(self, loaded: LoadedModel, prompt: str, references: list[Image.Image], seed: int) -> str:
        if loaded.placement.text_encoder == "stream":
            raise InputError(
                "expand_prompt",
                f"prompt expansion is not available for {loaded.key} on this server: its text encoder is streamed "
                "from host memory (too little GPU memory to keep it resident), which makes generating text "
                "minutes slow; send the request with prompt expansion off",
            )
        tokens = DEMO_EXPANSION_TOKENS if self.settings.demo else MAX_NEW_TOKENS
        return expand_prompt(loaded.pipe, prompt, references, seed=seed, max_new_tokens=tokens)

    def _encode(self, pipe, prompt: str, request: GenerationRequest):
        with torch.no_grad(), encoding_only(pipe):  # the text encoder stops after the last layer read
            prompt_embeds, _ = pipe.encode_prompt(prompt=prompt, device=self.device, num_images_per_prompt=1)
            negative = None
            if _uses_true_cfg(pipe, request.guidance):
                negative, _ = pipe.encode_prompt(prompt="", device=self.device, num_images_per_prompt=1)
        return prompt_embeds, negative

    def _denoise(self, pipe, request, references, prompt_embeds, negative_embeds, seed, width, height,
                 on_progress, should_cancel):
        total = len(request.sigmas) if request.sigmas else request.steps
        preview_steps = _preview_steps(total, request.partial_images)
        previous: dict[str, torch.Tensor] = {}

        def on_step(pipeline, i: int, t, kwargs: dict) -> dict:
            latents = kwargs["latents"]
            step = i + 1
            preview = None
            if step in preview_steps and "latents" in previous:
                sigmas = pipeline.scheduler.sigmas
                preview = plain_png(decoding.preview_from_step(
                    pipeline, previous["latents"], latents, float(sigmas[i]), float(sigmas[i + 1]), height, width))
            if preview_steps:
                previous["latents"] = latents
            if on_progress is not None:
                on_progress(Progress(step=step, total=total, message=f"step {step}/{total}", preview=preview))
            if step < total and _cancelled(should_cancel):
                raise GenerationCancelled(f"cancelled after step {step}/{total}")
            return {}

        kwargs = {
            "image": references or None,
            "prompt_embeds": prompt_embeds,
            "height": height,
            "width": width,
            "num_inference_steps": total,
            "sigmas": list(request.sigmas) if request.sigmas else None,
            "guidance_scale": request.guidance,
            "num_images_per_prompt": request.num_images,
            "generator": torch.Generator(device="cpu").manual_seed(seed),
            "output_type": "latent",
            "callback_on_step_end": on_step,
            "callback_on_step_end_tensor_inputs": ["latents"],
        }
        if negative_embeds is not None:
            kwargs["negative_prompt_embeds"] = negative_embeds
        with torch.no_grad():
            try:
                return pipe(**kwargs).images
            except ValueError as exc:
                if references and ("Image too small" in str(exc) or "Aspect ratio" in str(exc)):
                    raise InputError("image_urls", str(exc)) from None
                raise

    def _check_safety(self, images: list[Image.Image], tolerance: int) -> list[bool]:
        return list(self._safety_checker().check(images, tolerance))

    def _safety_checker(self) -> safety.SafetyChecker:
        if self._safety is None:
            with self._safety_lock:
                if self._safety is None:
                    if self.settings.demo:
                        ensure_demo_weights(self.settings.demo_dir, ())
                        source = self.settings.demo_dir / "safety"
                    else:
                        source = os.environ.get("FLUXSERVE_SAFETY_MODEL") or safety.DEFAULT_SAFETY_MODEL
                    self._safety = safety.SafetyChecker.load(source, self.device, token=self.settings.hf_token or None)
        return self._safety

    def _loras(self, pipe, request: GenerationRequest):
        if not request.loras:
            return nullcontext()
        loras = list(request.loras)
        if self.settings.demo:
            # The catalogue's preset LoRAs (Turbo) are made for the real weights; the demo has its own stand-in.
            presets = {preset.path for endpoint in self.catalog.endpoints.values() for preset in endpoint.loras}
            stand_in = str(demo_lora_path(self.settings.demo_dir))
            loras = [spec.model_copy(update={"path": stand_in}) if spec.path in presets else spec for spec in loras]
        return lora.applied_loras(pipe, loras, self.settings.cache_dir, token=self.settings.hf_token or None,
                                  max_cache_bytes=self.settings.lora_cache_bytes)


# ---- helpers ------------------------------------------------------------------------------------------------
def serving_devices(requested: str = "") -> list[str]:
    """The devices to serve on, one engine each: those named (``cuda:0,cuda:1``), else every CUDA GPU, else the
    CPU."""
    if requested:
        return [name.strip() for name in requested.split(",") if name.strip()]
    if torch.cuda.is_available():
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return ["cpu"]


def engines_for(settings: Settings, catalog: Catalog) -> list[Engine]:
    """One engine per serving device (the models stay resident on each)."""
    return [Engine(replace(settings, device=device), catalog) for device in serving_devices(settings.device)]


def encode_threads(settings: Settings) -> int:
    """The encoding pool's size: ``settings.encode_threads``, else one per CPU core up to 4."""
    return settings.encode_threads if settings.encode_threads > 0 else min(4, os.cpu_count() or 1)


def _pick_device(name: str) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def public_url(url: str) -> str:
    """``url`` without what may be secret: no user info, query or fragment (signed URLs carry their tokens
    there). The files' embedded parameters travel with every copy of an image."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return url
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _cancelled(should_cancel: CancelCheck | None) -> bool:
    return bool(should_cancel is not None and should_cancel())


def _uses_true_cfg(pipe, guidance: float) -> bool:
    """Klein base models run classifier-free guidance (a second, unconditional pass) when guidance > 1."""
    return pipe.__class__.__name__ == "Flux2KleinPipeline" and guidance > 1 and not pipe.config.is_distilled


def _preview_steps(total: int, count: int) -> set[int]:
    """``count`` steps spread evenly over the run (never the last: the final image follows it)."""
    if count <= 0 or total < 3:
        return set()
    return {max(2, round(total * (j + 1) / (count + 1))) for j in range(count)} - {total}

