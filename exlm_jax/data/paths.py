"""Where the real datasets live: env EXLM_DATA_DIR, else ../shared/data beside the checkout."""

import os
import pathlib

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def data_dir() -> pathlib.Path | None:
  """Returns the shared data folder, or None when neither EXLM_DATA_DIR nor ../shared/data exists."""
  env = os.environ.get("EXLM_DATA_DIR")
  if env:
    path = pathlib.Path(env).expanduser()
    if not path.is_dir():
      raise FileNotFoundError(f"EXLM_DATA_DIR={env} is not a directory; point it at the shared data folder")
    return path
  for candidate in (_REPO_ROOT.parent / "shared" / "data", pathlib.Path.cwd().parent / "shared" / "data"):
    if candidate.is_dir():
      return candidate
  return None


def resolve(path: str) -> str:
  """Expands `$DATA/...` (and `~`) in a config path; other paths are returned unchanged."""
  if path.startswith("$DATA/") or path == "$DATA":
    root = data_dir()
    if root is None:
      raise FileNotFoundError(
          f"{path!r} needs the shared data folder: set EXLM_DATA_DIR or place it at ../shared/data")
    return str(root / path[len("$DATA/"):]) if path != "$DATA" else str(root)
  return os.path.expanduser(path)
