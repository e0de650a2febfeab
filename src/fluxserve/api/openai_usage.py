"""The OpenAI dialect's ``usage`` object, in billable megapixels (docs/openai.md, "Usage").

OpenAI counts tokens; fluxserve bills megapixels (fluxserve.usage), so each token field holds megapixels:
``input_tokens`` and ``input_tokens_details.image_tokens`` the reference images', ``text_tokens`` 0 (the prompt
is not billed), ``output_tokens`` the output images', ``total_tokens`` both. Beside them: ``images`` (output
images), ``input_images`` and ``megapixels`` (the same as ``total_tokens``).
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from fluxserve.jobs import ledger
from fluxserve.usage import megapixels


def usage_object(input_images: int, input_megapixels: int, output_images: int,
                 output_megapixels: int) -> dict[str, Any]:
    total = input_megapixels + output_megapixels
    return {
        "input_tokens": input_megapixels,
        "input_tokens_details": {"text_tokens": 0, "image_tokens": input_megapixels},
        "output_tokens": output_megapixels,
        "total_tokens": total,
        "images": output_images,
        "input_images": input_images,
        "megapixels": total,
    }


async def jobs_usage(store: Any, jobs: list[Any]) -> dict[str, Any]:
    """The usage of finished jobs, summed from their ``job_usage`` rows."""
    sums = dict.fromkeys(("input_images", "input_megapixels", "output_images", "output_megapixels"), 0)
    for job in jobs:
        row = await run_in_threadpool(ledger.job_usage_row, store, job.id) or {}
        for name in sums:
            sums[name] += int(row.get(name) or 0)
    return usage_object(**sums)


async def image_usage(store: Any, job: Any, image: dict[str, Any], first: bool) -> dict[str, Any]:
    """The usage of one streamed image: its own megapixels, plus its job's reference images on the job's first
    image (so the events of a response add up to its whole usage)."""
    row = await run_in_threadpool(ledger.job_usage_row, store, job.id) if first else None
    row = row or {}
    return usage_object(int(row.get("input_images") or 0), int(row.get("input_megapixels") or 0), 1,
                        megapixels(image["width"], image["height"]))
