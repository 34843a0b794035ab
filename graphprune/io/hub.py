"""`--push-to-hub REPO`: upload a finished output to the Hugging Face Hub (`HfApi.upload_folder`).

Checked before any work (`check_push`): the repository id's form, and that the Hub may be reached
(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE refuse it in one line). A folder output is uploaded whole, its
model card first rewritten to load from the repository; a pruned .onnx file is uploaded with its
external data and the files beside it (NAME.README.md, NAME.recipe.yaml, NAME.kept_units.png).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_push(repo_id: str) -> None:
    from ..models.hub import require_online

    if not _REPO_ID.match(str(repo_id or "")):
        raise UserError(f"--push-to-hub {repo_id!r} is not a Hub repository id (owner/name)")
    require_online("--push-to-hub")


def push_output(out: str | Path, repo_id: str, *, private: bool = False, report: dict[str, Any] | None = None) -> str:
    """Upload `out` to `repo_id` (created if missing); the repository's URL."""
    check_push(repo_id)
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    out = Path(out)
    message = "graphprune: pruned model" + (f" ({report.get('criterion')}, sparsity "
                                            f"{report.get('requested_sparsity')})" if report else "")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if out.is_dir():
            from .hf import refresh_card

            refresh_card(out, repo_id=repo_id)  # "how to load" names the repository
            api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message=message)
        else:
            from .card import companion_paths

            names = [out.name, f"{out.name}_data", *(p.name for p in companion_paths(out).values())]
            api.upload_folder(folder_path=str(out.parent), repo_id=repo_id, commit_message=message,
                              allow_patterns=[n for n in names if (out.parent / n).exists()])
    except (hub_errors.HfHubHTTPError, hub_errors.OfflineModeIsEnabled, OSError, ValueError) as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({first}); the output is complete in {out} "
                        f"(log in with `hf auth login`, then `hf upload {repo_id} {out}`)") from error
    return str(url)
