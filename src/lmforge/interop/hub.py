"""The Hugging Face Hub: `lmforge download`, and model folders found in the local Hub cache.

Built on `huggingface_hub`: downloads resume where they stopped, a gated model reads the token of
`HF_TOKEN` (or `hf auth login`), and the cache is the one `transformers` uses (`HF_HOME`,
`HF_HUB_CACHE`), laid out as `models--ORG--NAME/{blobs, refs/REVISION, snapshots/COMMIT/...}` with
each snapshot file a relative link into `blobs/`. `lmforge import` reads a repo id through that cache
only, so it works offline (`HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

# What lmforge reads from a model repository: safetensors weights (never pickles), the configs, and the
# tokenizer with its chat template. Only top-level files: repos also hold `original/` or `onnx/` copies.
DOWNLOAD_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
DOWNLOAD_RECORD = "lmforge-download.json"  # in a --out folder: the repo, the revision asked, the commit
HTTP_CLIENTS = ("httpx", "httpx2", "requests", "urllib3")  # huggingface_hub's, across its versions
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Download:
    """Where `download` put a repository's files, and the commit they are from."""

    folder: Path
    repo_id: str
    commit: str
    files: tuple[str, ...]


def is_repo_id(text: str) -> bool:
    """ORG/NAME as the Hub spells a repository (a local path that exists is never taken for one)."""
    return REPO_ID.fullmatch(text) is not None and ".." not in text and not Path(text).exists()


def wanted_files(names: list[str]) -> list[str]:
    """The files of a repository that lmforge reads (`DOWNLOAD_PATTERNS`, top level only), sorted."""
    return sorted(
        name for name in names if "/" not in name and any(fnmatch.fnmatch(name, p) for p in DOWNLOAD_PATTERNS)
    )


def download(repo_id: str, revision: str | None = None, *, out: Path | None = None) -> Download:
    """`lmforge download`: the weights, configs and tokenizer of `repo_id` at `revision` (default: main),
    into the Hub cache, or into `out` with a DOWNLOAD_RECORD. The revision is resolved to a commit
    first, so that every file comes from that one commit."""
    from huggingface_hub import HfApi, snapshot_download

    if not is_repo_id(repo_id):
        raise LmforgeError(f"{repo_id!r} is not a Hugging Face repo id (expected ORG/NAME)")
    if out is not None:
        _check_download_folder(out, repo_id)
    if os.environ.get("LMFORGE_OFFLINE") == "1":  # as for named datasets: no network at all
        raise LmforgeError(
            f"{repo_id}: LMFORGE_OFFLINE=1 forbids downloading "
            f"(`lmforge import {repo_id}` reads a model already in the Hugging Face cache)"
        )
    with _hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision)
        commit = info.sha
        files = wanted_files([sibling.rfilename for sibling in info.siblings or []])
        if not any(name.endswith(".safetensors") for name in files):
            raise LmforgeError(
                f"{repo_id}: no safetensors weights at the top of the repository "
                "(lmforge downloads safetensors only, never pickled .bin files)"
            )
        if out is not None:  # first, so that an interrupted download is known as one and resumes
            out.mkdir(parents=True, exist_ok=True)
            record = {"repo_id": repo_id, "revision": revision or "main", "commit": commit, "files": files}
            (out / DOWNLOAD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        folder = snapshot_download(
            repo_id, revision=commit, allow_patterns=files, local_dir=str(out) if out is not None else None
        )
    return Download(Path(folder), repo_id, commit, tuple(files))


def _check_download_folder(out: Path, repo_id: str) -> None:
    """`out` is new, empty, or an earlier (maybe interrupted) download of the same repository, which
    `download` resumes; anything else is left alone."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LmforgeError(f"--out {out}: exists and is not a folder")
    record = out / DOWNLOAD_RECORD
    if record.is_file():
        try:
            earlier = json.loads(record.read_text()).get("repo_id")
        except (ValueError, OSError, AttributeError):
            earlier = None
        if earlier == repo_id:
            return
        raise LmforgeError(
            f"--out {out}: holds a download of {earlier!r}, not {repo_id}; choose another folder"
        )
    if any(name != ".cache" for name in (p.name for p in out.iterdir())):
        raise LmforgeError(
            f"--out {out}: exists and is not an earlier download of {repo_id}; choose another folder"
        )


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local Hub cache's snapshot folder of `repo_id` at `revision` (a branch, tag or commit;
    default main), without touching the network."""
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, revision, offline=True):
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))


def cache_blobs(folder: Path) -> Path | None:
    """The `blobs/` folder of the Hub cache repository whose snapshot `folder` is, else None: the one
    place outside a snapshot that its links may point to."""
    snapshots = folder.resolve().parent
    repo = snapshots.parent
    if snapshots.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    blobs = repo / "blobs"
    return blobs if blobs.is_dir() and not blobs.is_symlink() else None


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, *, offline: bool = False) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line LmforgeErrors that say what to do."""
    from huggingface_hub import errors

    where = repo_id + (f" at revision {revision}" if revision else "")
    try:
        yield
    except errors.GatedRepoError:
        message = "is gated: accept its license on huggingface.co and set HF_TOKEN to a token with access"
    except errors.RepositoryNotFoundError:
        message = "not found on the Hub (or private: set HF_TOKEN)"
    except errors.RevisionNotFoundError:
        message = "has no such revision"
    except getattr(errors, "IncompleteSnapshotError", ()):  # huggingface_hub 2 and later
        message = "is only partly in the local Hugging Face cache (run `lmforge download` again to finish it)"
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        fetch = f"`lmforge download {repo_id}` fetches it"
        message = (
            f"no such folder, nor a repo in the local Hugging Face cache ({fetch})"
            if offline
            else "cannot be downloaded: the Hub is unreachable or HF_HUB_OFFLINE is set"
        )
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as exc:
        message = f"failed: {' '.join(str(exc).split())}"
    except Exception as exc:  # no connection, a timeout: the HTTP client's own errors (httpx, requests)
        if type(exc).__module__.split(".")[0] not in HTTP_CLIENTS:
            raise
        message = f"cannot reach the Hub ({type(exc).__name__}: {' '.join(str(exc).split())})"
    else:
        return
    raise LmforgeError(f"{where}: {message}") from None
