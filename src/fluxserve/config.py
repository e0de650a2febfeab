"""Settings from environment variables, overridden by command-line flags.

Every setting has an environment variable ``FLUXSERVE_<NAME>``; the embedded defaults put the database,
the files and the model cache under one data directory (``~/.local/share/fluxserve`` unless
``FLUXSERVE_DATA_DIR`` says otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


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
    device: str = ""  # "cuda", "cuda:1", "cpu"; empty = cuda when available
    transformer_placement: str = "auto"  # auto | bf16 | fp8 | stream (fluxserve.engine.plan)
    text_encoder_placement: str = "auto"  # auto | resident | fp8 | stream
    workers_per_device: int = 1
    hf_token: str = ""
    # ---- limits at the edge (fluxserve.api.limits): 413 / 4xx naming the field in each dialect ----
    max_body_mb: int = 32  # request bodies other than file uploads (FLUXSERVE_MAX_UPLOAD_MB caps those)
    max_prompt_chars: int = 8192  # FLUX.2 reads at most 512 tokens of a prompt

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir / 'fluxserve.db'}"

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
            elif f.name == "demo":
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif f.type == "int":
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        if "hf_token" not in values and os.environ.get("HF_TOKEN"):
            values["hf_token"] = os.environ["HF_TOKEN"]
        settings = cls(**values)
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
