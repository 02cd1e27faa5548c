"""`lmforge download` and `import` of repo ids and cache snapshots, offline, against a Hub cache laid
out on disk as huggingface_hub lays it out (only the network fetch itself goes untested)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from lmforge import checkpoint as ckpt  # noqa: E402
from lmforge.data.chat_template import ChatTemplate  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.inference import load  # noqa: E402
from lmforge.interop.hub import cache_blobs, cached_snapshot, is_repo_id, wanted_files  # noqa: E402
from tests.interop.test_hf import CHATML, random_hf_model, save_hf  # noqa: E402

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache that huggingface_hub uses, offline (its constants are read at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_repo(source: Path, cache: Path, repo_id: str = REPO, *, commit: str = COMMIT) -> Path:
    """`source`'s files as the Hub cache holds a download of repo_id at `commit` on main: content in
    blobs/ named by hash, refs/main naming the commit, snapshots/COMMIT/ of relative links. Returns
    the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(source.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def tiny_model(folder: Path):
    """A random Llama saved as transformers saves it, with a byte tokenizer and a ChatML template."""
    hf = random_hf_model("llama")
    save_hf(hf, folder)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return hf


def assert_same_logits(run: Path, hf) -> None:
    ours = load(run, "last", "cpu", dtype="fp32").model
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_the_cache_built_here_is_one_huggingface_hub_reads(hub_cache: Path, tmp_path: Path) -> None:
    tiny_model(tmp_path / "hf")
    snapshot = cache_repo(tmp_path / "hf", hub_cache)
    info = huggingface_hub.scan_cache_dir(hub_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {COMMIT}
    assert huggingface_hub.try_to_load_from_cache(REPO, "config.json") == str(snapshot / "config.json")
    assert cached_snapshot(REPO) == snapshot


def test_import_of_a_repo_id_reads_the_local_cache_offline(cli, hub_cache: Path, tmp_path: Path) -> None:
    hf = tiny_model(tmp_path / "hf")
    cache_repo(tmp_path / "hf", hub_cache)
    code, out, err = cli("import", REPO, "--out", tmp_path / "run")
    assert code == 0, err
    assert f"imported {REPO}" in out and COMMIT in out
    assert_same_logits(tmp_path / "run", hf)
    template = ChatTemplate.find(ckpt.list_checkpoints(tmp_path / "run")[-1].path)
    assert template is not None and template.source == CHATML
    code, _, err = cli("import", REPO, "--revision", COMMIT, "--out", tmp_path / "by-commit")
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["other-org/absent"], "other-org/absent: no such folder, nor a repo in the local Hugging Face"),
        ([REPO, "--revision", "v2"], f"{REPO} at revision v2: no such folder, nor a repo in the local"),
    ],
)  # fmt: skip
def test_import_of_a_repo_id_missing_from_the_cache_is_one_line(
    cli, capsys: pytest.CaptureFixture, hub_cache: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    tiny_model(tmp_path / "hf")
    cache_repo(tmp_path / "hf", hub_cache)
    capsys.readouterr()  # transformers' progress output from saving the model
    code, _, err = cli("import", *args, "--out", tmp_path / "run")
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_import_of_a_snapshot_folder_follows_its_links_into_blobs(
    cli, hub_cache: Path, tmp_path: Path
) -> None:
    hf = tiny_model(tmp_path / "hf")
    snapshot = cache_repo(tmp_path / "hf", hub_cache)
    assert (snapshot / "model.safetensors").is_symlink()
    assert cache_blobs(snapshot) == (hub_cache / "models--tiny-org--tiny-llama" / "blobs").resolve()
    code, _, err = cli("import", snapshot, "--out", tmp_path / "run")
    assert code == 0, err
    assert_same_logits(tmp_path / "run", hf)


@pytest.mark.parametrize("where", ["elsewhere", "another-repos-blobs"])
def test_a_snapshot_link_anywhere_but_its_own_blobs_is_refused(
    cli, capsys: pytest.CaptureFixture, hub_cache: Path, tmp_path: Path, where: str
) -> None:
    tiny_model(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress output from saving the model
    snapshot = cache_repo(tmp_path / "hf", hub_cache)
    other = cache_repo(tmp_path / "hf", hub_cache, "other-org/other", commit="f" * 40)
    target = (
        tmp_path / "hf" / "tokenizer.json"
        if where == "elsewhere"
        else (other / "tokenizer.json").resolve()  # a blob, of another repository
    )
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(os.path.relpath(target, snapshot))
    code, _, err = cli("import", snapshot, "--out", tmp_path / "run")
    assert code == 1 and "tokenizer.json resolves to" in err and "outside the folder" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_folder_that_only_looks_like_a_snapshot_gets_no_blobs(tmp_path: Path) -> None:
    fake = tmp_path / "not-a-cache" / "snapshots" / "abc"
    fake.mkdir(parents=True)
    (tmp_path / "not-a-cache" / "blobs").mkdir()
    assert cache_blobs(fake) is None  # the repository folder is not models--ORG--NAME


def test_download_fetches_only_the_top_level_files_lmforge_reads() -> None:
    repo_files = [
        ".gitattributes", "LICENSE.txt", "README.md", "config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "original/consolidated.00.pth", "original/params.json",
        "onnx/model.safetensors", "pytorch_model.bin", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
    ]  # fmt: skip
    assert wanted_files(repo_files) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip


def test_download_without_the_hub_is_a_one_line_error(
    cli, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LMFORGE_OFFLINE", raising=False)  # huggingface_hub's own offline mode answers
    code, _, err = cli("download", REPO, "--out", tmp_path / "dl")
    assert code == 1 and err.count("\n") == 1, err
    assert f"{REPO}: cannot be downloaded: the Hub is unreachable or HF_HUB_OFFLINE is set" in err


def test_download_under_lmforge_offline_is_refused_before_any_request(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LMFORGE_OFFLINE=1 forbids downloads, as it does for named datasets: no request is made at all
    (huggingface_hub's own offline switch is left off here, so a request would be tried)."""
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("a request was made")
    )
    code, _, err = cli("download", REPO, "--out", tmp_path / "dl")
    assert code == 1 and err.count("\n") == 1, err
    assert f"{REPO}: LMFORGE_OFFLINE=1 forbids downloading" in err
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        ("not a repo", "is not a Hugging Face repo id (expected ORG/NAME)"),
        ("a/../b", "is not a Hugging Face"),
    ],
)
def test_download_refuses_what_is_not_a_repo_id(cli, hub_cache: Path, repo: str, message: str) -> None:
    code, _, err = cli("download", repo)
    assert code == 1 and message in err and err.count("\n") == 1


def test_download_never_writes_into_a_folder_that_is_not_an_earlier_download(
    cli, hub_cache: Path, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _, err = cli("download", REPO, "--out", mine)
    assert code == 1 and "is not an earlier download of tiny-org/tiny-llama" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "lmforge-download.json").write_text('{"repo_id": "other-org/other"}')
    code, _, err = cli("download", REPO, "--out", tmp_path / "dl")
    assert code == 1 and "holds a download of 'other-org/other'" in err


def test_a_local_folder_is_never_taken_for_a_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_repo_id("org/name")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_repo_id("org/name")
    assert not is_repo_id("/abs/path") and not is_repo_id("one-part")


def test_import_revision_needs_a_repo_id(cli, tmp_path: Path) -> None:
    tiny_model(tmp_path / "hf")
    code, _, err = cli("import", tmp_path / "hf", "--revision", "main", "--out", tmp_path / "run")
    assert code == 1 and "--revision is for a repo id" in err
    with pytest.raises(LmforgeError):
        cached_snapshot("absent-org/absent")
