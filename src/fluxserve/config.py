"""Settings from environment variables, overridden by command-line flags.

Every setting has an environment variable ``FLUXSERVE_<NAME>``; the embedded defaults put the database,
the files and the model cache under one data directory (``~/.local/share/fluxserve`` unless
``FLUXSERVE_DATA_DIR`` says otherwise).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

UPSTREAM_PROVIDERS = ("fal", "replicate")  # the protocols the gateway speaks (fluxserve.upstream)
GIB = 1024**3


def memory_size(text: str, name: str) -> int:
    """Bytes from "80GiB", "80 GiB", "80G" (GiB), "80GB" (10^9 bytes) or "141" (GiB); ``name`` (the flag or
    environment variable) is named in the error."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(gib|gb|g)?\s*", text.lower())
    if not match:
        raise ValueError(f"{name} {text!r}: expected a size like 80GiB, 24GiB or 141GB")
    unit = {"gb": 10**9}.get(match.group(2) or "gib", GIB)
    return int(float(match.group(1)) * unit)


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "fluxserve"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=_default_data_dir)
    db: str = ""  # SQLAlchemy URL; empty = SQLite file in data_dir
    storage: str = ""  # directory or s3://bucket/prefix; empty = data_dir/files
    catalog: str = ""  # TOML path; empty = the packaged catalog.toml
    demo: bool = False  # serve every endpoint with the tiny demo models
    # build the models with seeded random weights instead of loading any (benchmarks: no download, noise images,
    # safety checker off): "full" = the published architectures, on a CUDA GPU only (--random-weights);
    # "tiny" = small stand-ins with the same structure, anywhere (CPU checks of that path); "" = load weights
    random_weights: str = ""
    device: str = ""  # "cuda", "cuda:1", "cpu"; empty = cuda when available
    transformer_placement: str = "auto"  # auto | bf16 | fp8 | stream (fluxserve.engine.plan)
    text_encoder_placement: str = "auto"  # auto | resident | fp8 | stream
    # bytes of each GPU this process may use (fluxserve.engine.memory; 0: all of it); e.g. 80GiB makes a
    # larger GPU plan, place and run as an 80 GB one
    gpu_memory_cap: int = 0
    workers_per_device: int = 1
    encode_threads: int = 0  # threads per engine that encode images into files (0: one per CPU core, up to 4)
    hf_token: str = ""
    # where the public key that verifies fal-dialect webhook signatures is served, as a JWKS
    webhook_jwks_path: str = "/.well-known/jwks.json"
    max_queued: int = 10_000  # queued requests in all; a submit over it gets 429 (0: no limit)
    max_queued_per_key: int = 100  # queued requests per API key (0: no limit)
    retention_hours: float = 0.0  # delete jobs' inputs, outputs and files this long after submit (0: keep)
    file_url_hours: float = 168.0  # how long a signed file URL in a result works (default 7 days)
    # ---- input checks at the edge (fluxserve.jsonsafe): 4xx naming the field in each dialect ----
    max_json_depth: int = 32  # how deeply a request body's JSON may nest (FLUX.2 inputs nest 3 levels)
    # ---- outbound fetches of caller-supplied URLs (fluxserve.fetch) ----
    fetch_allow: str = ""  # CIDR[:PORT],... of internal addresses that may be fetched; empty = none
    fetch_connect_timeout: float = 10.0  # seconds to connect
    # each deadline: seconds for one whole exchange, connect to last byte, redirects included
    fetch_deadline: float = 60.0  # a reference image
    fetch_lora_deadline: float = 3600.0  # a LoRA file
    fetch_dataset_deadline: float = 600.0  # a training dataset archive
    fetch_max_reference_mb: float = 50.0  # MiB per reference image
    fetch_max_lora_mb: float = 16384.0  # MiB per LoRA file
    fetch_workers: int = 16  # threads that download references and datasets at submit (apart from the API's own)
    fetch_key_slots: int = 0  # of those, the most one API key holds at once (0: a quarter, at least 1)
    fetch_decode_slots: int = 4  # reference images decoded at once (and threads for data URIs, own files)
    # ---- webhook delivery (fluxserve.jobs.webhooks), in each API process ----
    webhook_concurrency: int = 16  # deliveries in flight at once (a slow receiver holds one of them)
    webhook_concurrency_per_key: int = 4  # of those, the most one API key's jobs may hold (0: no limit)
    # ---- limits at the edge (fluxserve.api.limits): 413 / 4xx naming the field in each dialect ----
    max_body_mb: int = 32  # request bodies other than file uploads (FLUXSERVE_MAX_UPLOAD_MB caps those)
    max_prompt_chars: int = 8192  # FLUX.2 reads at most 512 tokens of a prompt
    # ---- training datasets (fluxserve.training.limits): checked by their headers when a job is submitted,
    # decoded one image at a time on the worker ----
    dataset_max_files: int = 1000  # files in a dataset's archive (skipped ones included)
    dataset_max_archive_mb: float = 1024.0  # MiB of the archive itself (a download stops there)
    dataset_max_total_mb: float = 4096.0  # MiB of all images and captions, uncompressed
    dataset_max_file_mb: float = 64.0  # MiB of one image, uncompressed
    dataset_max_caption_kb: float = 64.0  # KiB of one caption
    dataset_max_ratio: float = 100.0  # uncompressed / compressed, per file and for the archive (zip bombs)
    dataset_max_image_megapixels: float = 14.0  # one image, from its header
    dataset_max_side: int = 2048  # pixels: longer sides are downscaled to this when decoded
    dataset_max_total_megapixels: float = 1024.0  # all images as kept (after downscaling), from their headers
    # ---- client connections (fluxserve.api.connections): slow or idle clients cannot hold the server ----
    http_header_timeout: float = 10.0  # seconds a connection has to send a complete request head
    http_keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    http_max_connections: int = 1000  # open client connections; over it the longest-waiting idle one is closed
    http_max_header_kb: int = 64  # KiB of one request head (request line and headers); longer: 431
    # ---- request bodies (fluxserve.api.bodies): none stalls the event loop ----
    max_json_values: int = 20_000  # JSON values in one request body (a bound counted as it arrives); more: 413
    # ---- LoRAs and stored files (fluxserve.engine.lora_cache, fluxserve.jobs.file_quota) ----
    lora_cache_gb: float = 64.0  # GiB of downloaded LoRAs kept per cache directory, LRU (0: no bound)
    # MiB of files one API key may keep stored (uploads, inputs stored for its requests); 0: no limit
    max_storage_mb_per_key: float = 10240.0
    # ---- the gateway (fluxserve.upstream): providers that serve the closed models ----
    upstream: str = ""  # NAME=URL,... e.g. fal=https://queue.fal.run; keys: FLUXSERVE_UPSTREAM_<NAME>_KEY
    gateway_workers: int = 8  # requests sent upstream at once by each serve process

    @property
    def upstreams(self) -> dict[str, str]:
        """``upstream`` as provider -> base URL."""
        out: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.upstream.split(","))):
            name, sep, url = item.partition("=")
            if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
                raise ValueError(f"upstream {item!r}: expected NAME=URL, e.g. fal=https://queue.fal.run")
            if name.strip() not in UPSTREAM_PROVIDERS:
                raise ValueError(f"upstream {item!r}: the providers are {', '.join(UPSTREAM_PROVIDERS)}")
            out[name.strip()] = url.strip()
        return out

    @staticmethod
    def upstream_key(name: str) -> str | None:
        """The key for provider ``name``: ``FLUXSERVE_UPSTREAM_<NAME>_KEY`` (or ``_TOKEN``), from the
        environment only (never a flag, never stored)."""
        prefix = f"FLUXSERVE_UPSTREAM_{name.upper()}"
        return os.environ.get(f"{prefix}_KEY") or os.environ.get(f"{prefix}_TOKEN") or None

    @property
    def lora_cache_bytes(self) -> int | None:
        """``lora_cache_gb`` in bytes; None for no bound."""
        return int(self.lora_cache_gb * GIB) if self.lora_cache_gb > 0 else None

    @property
    def max_storage_bytes_per_key(self) -> int | None:
        """``max_storage_mb_per_key`` in bytes; None for no limit."""
        return int(self.max_storage_mb_per_key * 1024**2) if self.max_storage_mb_per_key > 0 else None

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir / 'fluxserve.db'}"

    @property
    def db_url_shown(self) -> str:
        """The database URL with any password hidden, for logs and banners."""
        return masked_url(self.db_url)

    @property
    def storage_location(self) -> str:
        return self.storage or str(self.data_dir / "files")

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def demo_dir(self) -> Path:
        return self.cache_dir / "demo-weights"

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f"FLUXSERVE_{f.name.upper()}")
            if raw is None:
                continue
            if f.name == "data_dir":
                values[f.name] = Path(raw)
            elif f.name == "gpu_memory_cap":
                values[f.name] = memory_size(raw, "FLUXSERVE_GPU_MEMORY_CAP")
            elif f.name == "demo":
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif f.name == "random_weights":
                lowered = raw.strip().lower()
                values[f.name] = ("full" if lowered in ("1", "true", "yes", "on") else
                                  "" if lowered in ("", "0", "false", "no", "off") else lowered)
            elif f.type == "int":
                values[f.name] = int(raw)
            elif f.type == "float":
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        if "hf_token" not in values and os.environ.get("HF_TOKEN"):
            values["hf_token"] = os.environ["HF_TOKEN"]
        settings = cls(**values)
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


# query parameters of a database URL that carry a credential or name where one is kept (libpq's password,
# passfile, sslpassword, sslkey; drivers' token / secret / auth options)
_CREDENTIAL_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|cred", re.IGNORECASE)


def masked_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``: the password of its user-info part
    (``postgresql://u:***@host/db``) and the values of credential-bearing query parameters
    (``?password=***&sslpassword=***``). Everything else is left as written."""
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = "&".join(
        f"{name}=***" if sep and _CREDENTIAL_PARAM.search(unquote(name)) else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
    ) if parts.query else ""
    if netloc == parts.netloc and query == parts.query:
        return url
    head = f"{parts.scheme}://{netloc}" if url[len(parts.scheme) + 1:].startswith("//") else f"{parts.scheme}:"
    return head + parts.path + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
