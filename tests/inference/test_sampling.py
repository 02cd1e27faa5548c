"""The rules of generation that every front end shares: the sampling options."""

import pytest

from lmforge.errors import LmforgeError
from lmforge.inference.sampling import SamplingOptions


@pytest.mark.parametrize(
    "temperature, top_p, message",
    [(-0.1, None, "--temperature must be >= 0"), (1.0, 0.0, "--top-p must be in"), (1.0, 1.5, "--top-p")],
)
def test_sampling_options_out_of_range_are_refused(
    temperature: float, top_p: float | None, message: str
) -> None:
    with pytest.raises(LmforgeError, match=message):
        SamplingOptions(max_new_tokens=5, temperature=temperature, top_k=None, top_p=top_p)
    SamplingOptions(
        max_new_tokens=5, temperature=0.0, top_k=None, top_p=1.0
    )  # the bounds themselves are valid
