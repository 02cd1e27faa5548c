"""`lmforge sample`: continuations of a prompt, streamed."""

from pathlib import Path

import torch

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
