import os
from pathlib import Path

from django.conf import settings


def backup_dirs() -> list[Path]:
    root = settings.BACKUP_ROOT
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, and every directory and link by name."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(dirpath, name)
            rel = str(full.relative_to(root))
            if full.is_symlink():
                found[rel] = b"-> " + os.readlink(full).encode()
            elif full.is_file():
                found[rel] = full.read_bytes()
            else:
                found[rel] = b"<dir>"
    return found
