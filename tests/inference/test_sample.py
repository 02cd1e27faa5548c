"""`lmforge sample`: continuations of a prompt, streamed."""

import subprocess
import sys
from pathlib import Path

import torch

from lmforge.inference import ModelSource
from lmforge.inference.sample import SAMPLE_SEPARATOR, stream_samples
from lmforge.inference.sampling import SamplingOptions
from tests.conftest import random_char_run


def test_threads_sets_the_cpu_threads_the_model_runs_on(cli, tmp_path: Path) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, out, _ = cli("sample", run, "--threads", "1", "--max-new-tokens", "3", "--prompt", "ab")
        assert code == 0 and out and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_stream_samples_takes_its_sampling_as_one_sampling_options(tmp_path: Path) -> None:
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    options = SamplingOptions(max_new_tokens=3, temperature=0.0, top_k=None, top_p=None)
    source = ModelSource(run, "last", "cpu", "fp32")
    pieces = list(stream_samples(source, prompt="ab", options=options, seed=0, num_samples=2))
    text = "".join(pieces)
    assert text.endswith("\n")
    first, second = text[:-1].split(f"\n{SAMPLE_SEPARATOR}\n")
    assert first == second  # greedy: both samples are the same continuation of the prompt
    assert first.startswith("ab") and len(first) <= len("ab") + 3


def test_a_reader_that_stops_reading_ends_sample_as_sigpipe_would_without_a_traceback(tmp_path: Path) -> None:
    """`lmforge sample RUN | head -c 1`: the next write finds the pipe closed (BrokenPipeError)."""
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    command = [sys.executable, "-m", "lmforge", "sample", str(run), "--max-new-tokens", "500"]
    sample = subprocess.Popen(
        [*command, "--num-samples", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert sample.stdout.read(1)
    sample.stdout.close()
    errors = sample.stderr.read().decode()
    assert (sample.wait(timeout=60), errors) == (141, "")  # 128 + SIGPIPE, as `yes | head` ends


def test_a_prompt_longer_than_the_context_is_cropped_to_its_end_and_said_once(cli, tmp_path: Path) -> None:
    """nanoGPT crops a long prompt too; `sample` says so, once, on stderr (and samples as before)."""
    run = random_char_run(tmp_path / "run", "ab\n", n_layer=1, d_model=16, block_size=16)
    prompt = "ab" * 15
    code, out, err = cli("sample", run, "--prompt", prompt, "--max-new-tokens", "3", "--num-samples", "2")
    assert code == 0 and out.startswith(prompt)
    assert err == "warning: the prompt is 30 tokens; the model sees its last 16 (model.block_size)\n"
    code, _, err = cli("sample", run, "--prompt", prompt[:16], "--max-new-tokens", "3")
    assert code == 0 and err == ""
