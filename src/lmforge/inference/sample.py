"""`lmforge sample`: continuations of a prompt, streamed as text as they are generated."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from lmforge.inference.sampling import SamplingOptions
from lmforge.inference.session import InferenceSession, ModelSource

logger = logging.getLogger(__name__)

SAMPLE_SEPARATOR = "---------------"  # a line of its own between two samples


def stream_samples(
    source: ModelSource,
    *,
    prompt: str,
    options: SamplingOptions,
    seed: int,
    num_samples: int,
) -> Iterator[str]:
    """`num_samples` continuations of `prompt` by the checkpoint of `source`, as text pieces to print
    in order: each sample is the prompt and its continuation, with a separator line between samples
    and a newline at the end. Checkpoint and prompt are checked here, before the first piece (the
    options were checked when made)."""
    session = source.load()
    ids = session.prompt_ids(prompt)
    block_size = session.config.model.block_size
    if len(ids) > block_size:  # generate() crops it, as nanoGPT does: not silently
        logger.warning(
            f"the prompt is {len(ids)} tokens; the model sees its last {block_size} (model.block_size)"
        )
    # One generator for all samples: each continues the random stream of the one before.
    generator = torch.Generator(device=session.device).manual_seed(seed)
    return _samples(session, prompt, ids, options=options, generator=generator, num_samples=num_samples)


def _samples(
    session: InferenceSession,
    prompt: str,
    prompt_ids: list[int],
    *,
    options: SamplingOptions,
    generator: torch.Generator,
    num_samples: int,
) -> Iterator[str]:
    for n in range(num_samples):
        yield prompt
        yield from session.complete(prompt_ids, options, generator)
        yield "\n" if n == num_samples - 1 else f"\n{SAMPLE_SEPARATOR}\n"
