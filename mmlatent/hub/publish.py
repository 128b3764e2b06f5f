"""Publishing on the Hugging Face Hub: upload an export folder or a model, with its model card.

`push_folder` creates the repo (and branch) when needed and uploads a folder `mmlatent export` or
`LatentVLM.save_pretrained` wrote; `push_model` writes a model into a temporary folder with a model card
and uploads it. Tokens come from the argument, `HF_TOKEN` or the login cache; every failure (no token,
offline mode, no network, a rejected token, no write access) is a `HubAccessError` that says which. The
folder format itself is `mmlatent.model.serialization`'s; this module only moves folders to the Hub.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from mmlatent.hub.model_card import CardInfo, build_model_card
from mmlatent.model.generation import GenerationConfig
from mmlatent.model.latent_vlm import LatentVLM
from mmlatent.model.serialization import (
    CONFIG_FILE, DEFAULT_MAX_SHARD_SIZE, LIBRARY_NAME, HubAccessError, transport_errors, write_model_files,
)


def resolve_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN, else the login cache (`hf auth login`); a clear error when there is none."""
    token = token or get_token()
    if not token:
        raise HubAccessError(
            "no Hugging Face token: set the HF_TOKEN environment variable or run `hf auth login` "
            "(a token with write access is needed to push)"
        )
    return token


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
):
    """Upload an export folder to the Hub model repo `repo_id`; return the `CommitInfo`.

    Creates the repo if needed (`private` applies only then; an existing repo keeps its visibility) and the
    branch `revision` if given and missing. Raises `HubAccessError` naming the problem: no token, offline
    mode, no network, a rejected token or no write access.
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; push an mmlatent export folder")
    validate_repo_id(repo_id)
    api = HfApi(token=resolve_token(token), library_name=LIBRARY_NAME)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with mmlatent",
        )
    except OfflineModeIsEnabled as err:
        raise HubAccessError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload") from err
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status == 401:
            raise HubAccessError(f"cannot push to {repo_id}: the Hub rejected the token (401). ({err})") from err
        if status == 403:
            raise HubAccessError(f"cannot push to {repo_id}: the token has no write access (403). ({err})") from err
        raise HubAccessError(f"cannot push to {repo_id}: {err}") from err
    except transport_errors() as err:
        raise HubAccessError(
            f"cannot push to {repo_id}: the Hugging Face Hub is unreachable (no network?): {err}"
        ) from err


def push_model(
    model: LatentVLM,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    generation: GenerationConfig | None = None,
    commit_message: str | None = None,
):
    """Save `model` to a temporary folder with a model card and push it; returns the `CommitInfo`."""
    token = resolve_token(token)  # fail before writing anything
    with tempfile.TemporaryDirectory(prefix="mmlatent-push-") as tmp:
        folder = Path(tmp) / repo_id.split("/")[-1]
        folder.mkdir()
        files = write_model_files(model, folder, max_shard_size=max_shard_size, generation=generation)
        card = build_model_card(
            model.cfg, CardInfo(model_name=repo_id.split("/")[-1]), num_parameters=model.num_parameters(), files=files
        )
        card.save(folder / "README.md")
        return push_folder(folder, repo_id, private=private, revision=revision, token=token,
                           commit_message=commit_message)
