"""Archive the workspace into a gzip tar, and check and extract one without trusting it."""

import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from trusca.backups import gz

Progress = Callable[[int], None]


class WorkspaceError(Exception):
    pass


class UnsafeArchive(WorkspaceError):
    pass


def measure(root: Path) -> int:
    """Bytes of regular files under root: the denominator of the progress bar."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue  # archive() reports it, with the path
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


class _StreamingTar(tarfile.TarFile):
    """A tar read or written once, front to back. TarFile keeps every member it has seen, which
    grows with the archive; a stream never looks back, so memory stays flat whatever its size."""

    # tarfile copies member data in 16 KiB pieces by default; bigger ones cut the per-call cost.
    copybufsize = gz.CHUNK

    def addfile(self, tarinfo, fileobj=None):
        super().addfile(tarinfo, fileobj)
        self.members.clear()

    def next(self):
        self.members.clear()
        return super().next()


def archive(root: Path, out, *, progress: Progress) -> None:
    if not root.is_dir():
        raise WorkspaceError(f"the workspace directory {root} does not exist or is not a directory")
    with _StreamingTar.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for full, arcname in _walk(root):
            try:
                info = tar.gettarinfo(full, arcname)
            except OSError as exc:
                raise WorkspaceError(f"cannot read {full}: {exc.strerror}") from None
            # Whole seconds, as GNU tar keeps them: a fractional mtime costs every member an
            # extra PAX header, which doubles the headers a restore has to parse.
            info.mtime = int(info.mtime)
            if info.isreg():
                try:
                    fh = open(full, "rb")
                except OSError as exc:
                    raise WorkspaceError(f"cannot read {full}: {exc.strerror}") from None
                with fh:  # write errors (a full disk) propagate as themselves
                    tar.addfile(info, fh)
                progress(info.size)
            elif info.isdir() or info.issym() or info.islnk():
                tar.addfile(info)
            # Sockets, fifos and devices are not workspace data and cannot be restored safely.


def _walk(root: Path):
    def onerror(exc: OSError):
        raise WorkspaceError(f"cannot read {exc.filename}: {exc.strerror}")

    for dirpath, dirs, files in os.walk(root, onerror=onerror):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(dirpath, name)
            arcname = name if rel == "." else f"{rel}/{name}"
            yield full, arcname
        # os.walk does not descend into symlinked directories; they are archived as links.


def check_member(info: tarfile.TarInfo, seen_links: set[str], seen_files: set[str]) -> None:
    """Refuse a member that could write outside the extraction directory, or is not plain data."""
    name = info.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"member {name!r} has an absolute path")
    if ".." in parts:
        raise UnsafeArchive(f"member {name!r} contains '..'")
    normalized = "/".join(p for p in parts if p != ".")
    for i in range(1, len(parts)):
        if "/".join(p for p in parts[:i] if p != ".") in seen_links:
            raise UnsafeArchive(f"member {name!r} is written through the symlink {'/'.join(parts[:i])!r}")
    if info.ischr() or info.isblk() or info.isfifo():
        raise UnsafeArchive(f"member {name!r} is a device or fifo")
    if info.issym():
        target = info.linkname
        if target.startswith("/"):
            raise UnsafeArchive(f"symlink {name!r} points to the absolute path {target!r}")
        resolved = os.path.normpath(os.path.join(os.path.dirname(normalized), target))
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(f"symlink {name!r} points outside the workspace ({target!r})")
        seen_links.add(normalized)
    elif info.islnk():
        target = "/".join(p for p in PurePosixPath(info.linkname).parts if p != ".")
        if info.linkname.startswith("/") or ".." in PurePosixPath(info.linkname).parts or target not in seen_files:
            raise UnsafeArchive(f"hardlink {name!r} points outside the archive ({info.linkname!r})")
    elif not (info.isreg() or info.isdir()):
        raise UnsafeArchive(f"member {name!r} has an unsupported type")
    if info.isreg() or info.islnk():
        seen_files.add(normalized)


def _plain_data(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    """What tarfile's 'data' filter does to modes, without its realpath() of every member (a
    third of a restore's extraction time): check_member has already refused anything that could
    leave the fresh staging directory, which holds nothing but what this archive put there."""
    mode = None if member.mode is None else member.mode & 0o777
    if member.isreg() and mode is not None:
        mode |= 0o600  # the owner can always read and write what was restored
    return member.replace(mode=mode, deep=False)


def check(stream) -> int:
    """Read the whole archive: it decompresses and lists, and every member is safe. Member count."""
    seen_links: set[str] = set()
    seen_files: set[str] = set()
    count = 0
    try:
        with _StreamingTar.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                check_member(info, seen_links, seen_files)
                count += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise WorkspaceError(f"the workspace archive does not read to its end as a tar archive ({exc})") from None
    return count


def extract(stream, target: Path) -> None:
    """Extract into target, which must not exist yet; members are checked again as they come."""
    target.mkdir()
    seen_links: set[str] = set()
    seen_files: set[str] = set()
    try:
        with _StreamingTar.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                check_member(info, seen_links, seen_files)
                tar.extract(info, target, set_attrs=True, filter=_plain_data)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise WorkspaceError(f"the workspace archive could not be extracted ({exc})") from None
