import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trusca.backups import workspace
from trusca.backups.workspace import UnsafeArchive, WorkspaceError

# Building archives: tarfile writes whatever it is given, hostile names included -------------


def tar_of(*members, format=tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as tar:
        for add in members:
            add(tar)
    return buffer.getvalue()


def file(name: str, data: bytes = b"owned", **attrs):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
        for key, value in attrs.items():
            setattr(info, key, value)
        tar.addfile(info, io.BytesIO(data))

    return add


def entry(name: str, kind: bytes, linkname: str = "", **attrs):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode, info.mtime = kind, linkname, 0o755, 1_500_000_000
        for key, value in attrs.items():
            setattr(info, key, value)
        tar.addfile(info)

    return add


def directory(name: str, **attrs):
    return entry(name, tarfile.DIRTYPE, **attrs)


def symlink(name: str, target: str):
    return entry(name, tarfile.SYMTYPE, target)


def hardlink(name: str, target: str):
    return entry(name, tarfile.LNKTYPE, target)


# A sandbox: the target is extracted beside decoys an escape would reach ---------------------


@pytest.fixture
def sandbox(tmp_path) -> Path:
    return make_sandbox(tmp_path / "sandbox")


def make_sandbox(root: Path) -> Path:
    (root / "outside" / "dir").mkdir(parents=True)
    (root / "outside" / "victim.txt").write_text("the victim")
    (root / "outside" / "dir" / "inner.txt").write_text("inner")
    os.symlink("victim.txt", root / "outside" / "link")
    (root / "victim.txt").write_text("beside the workspace")
    (root / "a").mkdir()
    (root / "a" / "victim.txt").write_text("in a sibling")
    return root


def snapshot(root: Path, skip: str = "ws") -> dict:
    """Everything in the sandbox but the target: names, types, modes, owners, link counts,
    times, contents and link targets."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        if dirpath == str(root) and skip in dirs:
            dirs.remove(skip)
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = Path(path).read_bytes()
            else:
                content = None
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_nlink, st.st_mtime_ns, content)
    return found


def outcome(run) -> str:
    try:
        run()
    except UnsafeArchive as exc:
        return f"unsafe: {exc}"
    except WorkspaceError as exc:
        return f"error: {exc}"
    return "ok"


def refused(data: bytes, sandbox: Path, match: str) -> None:
    """check() and extract() both refuse, with the same one-line message, and nothing outside
    the target changed."""
    before = snapshot(sandbox)
    with pytest.raises(UnsafeArchive, match=match) as checked:
        workspace.check(io.BytesIO(data))
    with pytest.raises(UnsafeArchive, match=match) as extracted:
        workspace.extract(io.BytesIO(data), sandbox / "ws")
    assert str(checked.value) == str(extracted.value)
    assert one_readable_line(str(checked.value))
    assert snapshot(sandbox) == before
    shutil.rmtree(sandbox / "ws", ignore_errors=True)  # as the caller does


def one_readable_line(message: str) -> bool:
    return "\n" not in message and not re.search(r"(?<![\w'])b'|\\x", message)


def extracted(data: bytes, target: Path) -> Path:
    members = workspace.check(io.BytesIO(data))
    workspace.extract(io.BytesIO(data), target)
    assert members > 0
    return target


def links_stay_inside(target: Path) -> None:
    real = os.path.realpath(target)
    for dirpath, dirs, files in os.walk(target):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                resolved = os.path.realpath(path)
                assert resolved == real or resolved.startswith(real + os.sep), f"{path} -> {resolved}"


# The shapes that beat the lexical checks (issue 7, item 1) ----------------------------------


def test_it_refuses_a_file_written_over_a_link_chain_that_climbs_out(sandbox):
    data = tar_of(symlink("a", "."), symlink("s", "a/../outside/victim.txt"), file("s", b"pwned"))
    refused(data, sandbox, "member 's' appears twice in the archive")
    assert (sandbox / "outside" / "victim.txt").read_text() == "the victim"


def test_it_refuses_a_link_chain_that_would_be_left_pointing_out(sandbox):
    data = tar_of(symlink("a", "."), symlink("b", "a/../outside"))
    refused(data, sandbox, r"^symlink 'b' points outside the workspace \(a/../outside\)$")


def test_it_refuses_a_file_written_through_a_link_chain(sandbox):
    data = tar_of(symlink("a", "."), symlink("b", "a/../outside"), file("b/x", b"pwned"))
    refused(data, sandbox, "member 'b/x' is written through the symlink 'b'")
    assert not (sandbox / "outside" / "x").exists()


def test_it_refuses_a_hardlink_to_a_chained_link(sandbox):
    chain = (symlink("a", "."), symlink("s", "a/../outside/victim.txt"))
    refused(tar_of(*chain, hardlink("h", "s")), sandbox, "hardlink 'h' points outside the archive: 's' is not a file")
    refused(tar_of(*chain, file("s"), hardlink("h", "s")), sandbox, "member 's' appears twice")
    assert os.stat(sandbox / "outside" / "victim.txt").st_nlink == 1


def test_it_refuses_a_link_that_a_later_link_turns_outward(sandbox):
    # When 'b' arrives, 'a' does not exist and a/../outside reads as the workspace's own 'outside'.
    data = tar_of(symlink("b", "a/../outside"), symlink("a", "."))
    refused(data, sandbox, "symlink 'b' points outside the workspace")


def test_it_refuses_a_link_through_a_directory_link_that_climbs_out(sandbox):
    data = tar_of(
        directory("d"), directory("d/e"), symlink("up", "d/e"), symlink("d/e/x", "../.."), symlink("y", "up/x/..")
    )
    refused(data, sandbox, "symlink 'y' points outside the workspace")


def test_it_refuses_a_symlink_loop(sandbox):
    refused(tar_of(symlink("a", "b"), symlink("b", "a")), sandbox, "symlink 'a' loops or follows more than 40 links")
    refused(tar_of(symlink("self", "self/x")), sandbox, "symlink 'self' loops")


def test_it_refuses_a_chain_longer_than_the_kernel_follows(sandbox):
    chain = [symlink(f"l{i}", f"l{i + 1}") for i in range(45)]
    refused(tar_of(*chain, file("l45")), sandbox, "symlink 'l0' loops or follows more than 40 links")


def test_links_that_stay_inside_are_kept_however_they_chain(tmp_path):
    data = tar_of(
        directory("d"),
        file("d/f", b"inside"),
        symlink("a", "d"),
        symlink("b", "a/f"),
        symlink("c", "b"),
        symlink("d/up", ".."),
        symlink("d/loopback", "up/d/up/a/../d/f"),
        symlink("dangling", "missing/file"),
        symlink("dot", "."),
    )
    target = extracted(data, tmp_path / "ws")
    assert (target / "c").read_bytes() == b"inside"
    assert (target / "d" / "loopback").read_bytes() == b"inside"
    assert os.readlink(target / "d" / "up") == ".."
    links_stay_inside(target)


def test_it_refuses_absolute_names_and_dotdot(sandbox):
    refused(tar_of(file("/tmp/absolute.txt")), sandbox, "member '/tmp/absolute.txt' has an absolute path")
    refused(tar_of(file("1/../../escaped.txt")), sandbox, "member '1/../../escaped.txt' contains '..'")
    refused(tar_of(symlink("x", str(sandbox / "outside"))), sandbox, "symlink 'x' points to the absolute path")
    refused(tar_of(symlink("x", "..")), sandbox, r"symlink 'x' points outside the workspace \(..\)")
    refused(tar_of(hardlink("p", "/etc/passwd")), sandbox, "hardlink 'p' points outside the archive")
    refused(tar_of(file("f"), hardlink("p", "./x/../f")), sandbox, "hardlink 'p' points outside the archive")


def test_it_refuses_duplicates_and_a_file_where_a_directory_is(sandbox):
    refused(tar_of(file("x"), file("./x")), sandbox, "member './x' appears twice in the archive")
    refused(tar_of(directory("d"), directory("d/")), sandbox, "member 'd/' appears twice")
    refused(tar_of(file("d/f"), file("d")), sandbox, "member 'd' has the name of a directory")
    refused(tar_of(file("f"), file("f/g")), sandbox, "member 'f/g' is inside 'f', which is not a directory")
    refused(tar_of(symlink("alias", "d"), file("alias/x")), sandbox, "member 'alias/x' is written through the symlink")


def test_it_refuses_a_tree_deeper_than_a_restore_can_clean_up(sandbox):
    # 2,000 levels fit in PATH_MAX, and shutil.rmtree of them (a failed staging) hits the
    # recursion limit: the next restore could not even clear the staging directory.
    deep = "/".join(["d"] * workspace.MAX_DEPTH)
    refused(tar_of(file(deep + "/f")), sandbox, r"member 'd/d/.*/d/f' is nested more than 256 directories deep")
    assert workspace.check(io.BytesIO(tar_of(file(deep)))) == 1


def test_a_workspace_too_deep_to_restore_is_not_archived(tmp_path):
    source = tmp_path / "source"
    deep = source.joinpath(*["d"] * workspace.MAX_DEPTH)
    deep.mkdir(parents=True)
    sink = Sink()
    workspace.archive(source, sink, progress=lambda n: None)  # as deep as a restore allows
    (deep / "f").write_bytes(b"x")
    assert workspace.measure(source) == 1
    with pytest.raises(WorkspaceError, match=r"/d/f is nested more than 256 directories deep, which a restore"):
        workspace.archive(source, Sink(), progress=lambda n: None)


def test_it_refuses_devices_fifos_and_unknown_types(sandbox):
    refused(tar_of(entry("sda", tarfile.BLKTYPE, devmajor=8)), sandbox, "member 'sda' is a device or fifo")
    refused(tar_of(entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3)), sandbox, "member 'null' is a device")
    refused(tar_of(entry("pipe", tarfile.FIFOTYPE)), sandbox, "member 'pipe' is a device or fifo")
    refused(tar_of(entry("vol", b"V")), sandbox, "member 'vol' has an unsupported type")


def gnu_tar_of_a_sparse_file(tmp_path: Path, format: str) -> bytes:
    source = tmp_path / f"sparse-{format}"
    source.mkdir()
    with open(source / "huge", "wb") as fh:
        fh.truncate(100 * 1024**3)
    result = subprocess.run(
        ["tar", "--sparse", f"--format={format}", "-C", str(source), "-cf", "-", "huge"],
        capture_output=True,
        check=True,
    )
    return result.stdout


@pytest.mark.parametrize("format", ["gnu", "posix"])
def test_it_refuses_a_sparse_member_before_writing_anything(sandbox, tmp_path, format):
    data = gnu_tar_of_a_sparse_file(tmp_path, format)
    assert len(data) < 20_000  # 100 GB of holes in a few blocks
    refused(data, sandbox, "is a sparse file")
    leftover = sandbox / "ws"
    assert not leftover.exists() or not any(leftover.iterdir())


def test_it_refuses_a_sparse_map_in_pax_headers(sandbox):
    fake = file("f", b"x" * 10, pax_headers={"GNU.sparse.size": "107374182400", "GNU.sparse.numblocks": "1"})
    refused(tar_of(fake), sandbox, "member 'f' is a sparse file")


# What is written: owned by us, sane modes, times kept ----------------------------------------


def test_files_belong_to_the_running_user_whatever_the_archive_says(tmp_path):
    data = tar_of(directory("d", uid=12345, gid=12345), file("d/f", uid=12345, gid=54321, uname="mallory"))
    target = extracted(data, tmp_path / "ws")
    for path in (target / "d", target / "d" / "f"):
        assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid())


def test_setuid_setgid_sticky_and_world_write_bits_are_stripped(tmp_path):
    data = tar_of(
        file("tool.sh", b"#!\n", mode=0o7777),
        file("shared.txt", mode=0o666),
        file("locked.txt", mode=0o000),
        directory("tmp", mode=0o1777),
        directory("closed", mode=0o000),
    )
    target = extracted(data, tmp_path / "ws")
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in target.iterdir()}
    assert modes == {"tool.sh": 0o775, "shared.txt": 0o664, "locked.txt": 0o600, "tmp": 0o775, "closed": 0o700}


def test_a_read_only_directory_gets_its_contents_and_then_its_mode_and_time(tmp_path):
    data = tar_of(
        directory("ro", mode=0o555, mtime=1_400_000_000),
        directory("ro/sub", mode=0o500, mtime=1_300_000_000),
        file("ro/sub/f", b"data", mode=0o444, mtime=1_200_000_000),
        symlink("ro/l", "sub/f"),
    )
    target = extracted(data, tmp_path / "ws")
    assert (target / "ro" / "sub" / "f").read_bytes() == b"data"
    assert stat.S_IMODE((target / "ro").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "ro" / "sub").stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "ro" / "sub" / "f").stat().st_mode) == 0o644
    assert (target / "ro").stat().st_mtime == 1_400_000_000
    assert (target / "ro" / "sub").stat().st_mtime == 1_300_000_000
    assert (target / "ro" / "sub" / "f").stat().st_mtime == 1_200_000_000
    assert (target / "ro" / "l").lstat().st_mtime == 1_500_000_000


def test_the_target_must_not_exist(tmp_path):
    (tmp_path / "ws").mkdir()
    with pytest.raises(WorkspaceError, match="already exists"):
        workspace.extract(io.BytesIO(tar_of(file("f"))), tmp_path / "ws")


# Streams that are not whole tar archives ------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:700], "ends in the middle of member 'big'"),
        (lambda data: data[: 512 + 4096], "ends without its end-of-archive marker"),
        (lambda data: data + b"junk", "data after its end-of-archive marker"),
        (lambda data: b"\x01" + data[1:], "bad header checksum at byte 0"),
        (lambda data: b"not a tar archive at all" * 100, "bad header checksum at byte 0"),
        (lambda data: b"", "ends without its end-of-archive marker"),
    ],
)
def test_a_damaged_stream_is_refused_in_one_line(tmp_path, damage, message):
    data = damage(tar_of(file("big", b"x" * 4096), file("small")))
    for run in (
        lambda: workspace.check(io.BytesIO(data)),
        lambda: workspace.extract(io.BytesIO(data), tmp_path / "ws"),
    ):
        with pytest.raises(WorkspaceError, match=message) as caught:
            run()
        assert one_readable_line(str(caught.value))
        shutil.rmtree(tmp_path / "ws", ignore_errors=True)


def test_headers_that_our_archives_never_hold_are_refused(sandbox):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "elsewhere"}) as tar:
        file("f")(tar)
    refused(buffer.getvalue(), sandbox, "global PAX header at byte 0")
    refused(tar_of(file("f", pax_headers={"comment": "x" * 2_000_000})), sandbox, "extended header of 2000017 bytes")
    with pytest.raises(WorkspaceError, match="impossible modification time at byte 1024"):
        workspace.check(io.BytesIO(tar_of(file("f", mtime=10**20))))


def test_names_are_shown_readably_whatever_bytes_they_hold(sandbox):
    name = os.fsdecode(b"caf\xe9\nlog line")
    refused(tar_of(file(name), file(name), format=tarfile.GNU_FORMAT), sandbox, r"member 'caf\ufffd\?log line' appears")


# Archiving ---------------------------------------------------------------------------------


class Sink(io.RawIOBase):
    def __init__(self):
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.data += data
        return len(data)


def make_tree(root: Path) -> None:
    deep = root / ("long-directory-name-" * 6) / ("nested-" * 20)
    deep.mkdir(parents=True)
    (deep / ("file-with-a-long-name-" * 5)).write_bytes(b"deep")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "src" / "empty").write_bytes(b"")
    (root / "src" / "tool.sh").write_text("#!/bin/sh\n")
    (root / "src" / "tool.sh").chmod(0o750)
    (root / "empty-dir").mkdir()
    (root / os.fsdecode(b"latin-\xe9.txt")).write_text("not UTF-8 in its name")
    (root / "ünïcødé.txt").write_text("UTF-8 in its name")
    os.symlink("src/main.py", root / "link")
    os.symlink("../" * 3 + "nowhere", root / "src" / "dangling-up")
    os.link(root / "src" / "main.py", root / "hard")
    os.mkfifo(root / "fifo")
    os.utime(root / "src" / "main.py", (1_000_000_000, 1_000_000_000))


def state(root: Path) -> dict:
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            if stat.S_ISREG(st.st_mode):
                content = Path(path).read_bytes()
            found[os.path.relpath(path, root)] = (st.st_mode, int(st.st_mtime), content)
    return found


def test_an_archive_restores_the_same_tree(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    sink = Sink()
    workspace.archive(source, sink, progress=lambda n: None)
    assert not sink.closed
    data = bytes(sink.data)
    listed = subprocess.run(["tar", "-tf", "-"], input=data, capture_output=True, check=True).stdout.decode()
    assert "src/main.py" in listed.splitlines() and "fifo" not in listed
    # The dangling link climbs out of the workspace: archived as it is, refused on the way back.
    with pytest.raises(UnsafeArchive, match="symlink 'src/dangling-up' points outside the workspace"):
        workspace.check(io.BytesIO(data))
    os.unlink(source / "src" / "dangling-up")
    os.unlink(source / "fifo")
    sink = Sink()
    workspace.archive(source, sink, progress=lambda n: None)
    target = extracted(bytes(sink.data), tmp_path / "ws")
    assert state(target) == state(source)
    assert os.stat(target / "hard").st_ino == os.stat(target / "src" / "main.py").st_ino
    assert workspace.check(io.BytesIO(bytes(sink.data))) == len(state(source))


@pytest.mark.parametrize("format", ["gnu", "posix", "ustar"])
def test_it_extracts_what_gnu_tar_archives(tmp_path, format):
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    os.unlink(source / "src" / "dangling-up")
    os.unlink(source / "fifo")
    if format == "ustar":  # ustar cannot hold names this long
        shutil.rmtree(source / ("long-directory-name-" * 6))
    data = subprocess.run(
        ["tar", f"--format={format}", "-C", str(source), "-cf", "-", "."], capture_output=True, check=True
    ).stdout
    target = extracted(data, tmp_path / "ws")
    assert state(target) == state(source)


class Dribble(io.RawIOBase):
    """A stream that hands out a few bytes at a time, as a decompressor may."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n=-1) -> bytes:
        return self._data.read(min(n, 7) if n > 0 else 7)


def test_a_stream_read_a_few_bytes_at_a_time_extracts_the_same(tmp_path):
    long_name = "d/" + "x" * 200
    data = tar_of(directory("d"), file(long_name, b"y" * 3000), symlink("d/l", "x" * 200), file("e", b""))
    assert workspace.check(Dribble(data)) == 4
    workspace.extract(Dribble(data), tmp_path / "ws")
    assert (tmp_path / "ws" / long_name).read_bytes() == b"y" * 3000
    assert (tmp_path / "ws" / "d" / "l").read_bytes() == b"y" * 3000


def test_progress_moves_inside_a_large_file(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    size = 50 * 1024 * 1024 + 123
    with open(source / "big.bin", "wb") as fh:
        fh.write(os.urandom(size))
    calls = []
    sink = Sink()
    workspace.archive(source, sink, progress=calls.append)
    # Progress counts the tar stream as it flows: the file's bytes, its header and padding.
    assert size == workspace.measure(source) <= sum(calls) == len(sink.data) <= size + 64 * 1024
    assert len(calls) >= 40 and max(calls) <= 2 * 1024 * 1024
    assert len(sink.data) % 10240 == 0
    target = extracted(bytes(sink.data), tmp_path / "ws")
    assert (target / "big.bin").read_bytes() == (source / "big.bin").read_bytes()


def test_archiving_a_missing_workspace_is_a_clear_error(tmp_path):
    with pytest.raises(WorkspaceError, match="does not exist or is not a directory"):
        workspace.archive(tmp_path / "nowhere", Sink(), progress=lambda n: None)


# The property: whatever the archive holds, nothing outside the target changes -----------------

COMPONENTS = ["a", "b", "outside", "victim.txt", "dir", "."]
plain = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=3).map("/".join).filter(lambda p: p.strip("./"))
relative = st.lists(st.sampled_from([*COMPONENTS, "..", ".."]), min_size=1, max_size=4).map("/".join)
# '@' stands for the sandbox's absolute path, known only when the example runs.
absolute = st.sampled_from(["@/outside", "@/victim.txt", "@/a/victim.txt", "/"])
targets = st.sampled_from([relative] * 6 + [relative.map(lambda p: "../" + p), absolute]).flatmap(lambda s: s)


def members_named(names, kinds=("file", "dir", "symlink", "symlink", "hardlink")):
    arguments = {
        "file": st.binary(max_size=16),
        "dir": st.integers(0, 0o7777),
        "symlink": targets,
        "hardlink": st.one_of(plain, targets),
    }
    return st.sampled_from(kinds).flatmap(lambda kind: st.tuples(st.just(kind), names, arguments[kind]))


def with_one_odd_member(spec):
    """Often one more member: a hostile name, a name already taken, or a hardlink to a name."""
    taken = st.sampled_from([name for _kind, name, _arg in spec])
    odd = st.one_of(
        members_named(hostile),
        taken.flatmap(lambda name: members_named(st.just(name))),
        st.tuples(st.just("hardlink"), plain, taken),
    )
    insert = st.tuples(odd, st.integers(0, len(spec))).map(lambda t: [*spec[: t[1]], t[0], *spec[t[1] :]])
    return st.one_of(st.just(spec), insert)


# Mostly plain, distinct names: most archives get past their names to where their links matter.
hostile = st.one_of(relative, relative.map(lambda p: "/" + p), relative.map(lambda p: "@/" + p))
archives = st.lists(
    members_named(plain, kinds=("file", "dir", "symlink", "symlink")), min_size=1, max_size=8, unique_by=lambda m: m[1]
).flatmap(with_one_odd_member)


def build(spec, sandbox: Path) -> bytes:
    def place(text: str) -> str:
        return text.replace("@", str(sandbox))

    adders = []
    for kind, name, arg in spec:
        if kind == "file":
            adders.append(file(place(name), arg))
        elif kind == "dir":
            adders.append(directory(place(name), mode=arg))
        else:
            adders.append(entry(place(name), tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE, place(arg)))
    return tar_of(*adders)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=archives)
def test_nothing_outside_the_target_ever_changes(spec):
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = make_sandbox(Path(tmp) / "sandbox")
        data = build(spec, sandbox)
        before = snapshot(sandbox)
        checked = outcome(lambda: workspace.check(io.BytesIO(data)))
        extraction = outcome(lambda: workspace.extract(io.BytesIO(data), sandbox / "ws"))
        assert snapshot(sandbox) == before
        assert checked == extraction
        if extraction == "ok":
            links_stay_inside(sandbox / "ws")
            for dirpath, _dirs, files in os.walk(sandbox / "ws"):
                for name in files:
                    st = os.lstat(os.path.join(dirpath, name))
                    assert st.st_uid == os.getuid()
                    if stat.S_ISREG(st.st_mode):
                        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | 0o002)
