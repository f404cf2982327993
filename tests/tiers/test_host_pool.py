"""HostPool: shared memory that every TP rank of an engine maps (unpinned here): a memfd, or a /dev/shm segment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch
from kvtensors import (
    SENTINEL,
    SHAPES,
    Pages,
    assert_bytes_equal,
    block_choice,
    expected_gather,
    expected_scatter,
    make_rank_kv,
    random_bytes,
)

import dynkv

# Attaches, prints size and SHA-256 of the pool, then writes 0x5A over its first 100 bytes.
CHILD = textwrap.dedent(
    """
    import ctypes, hashlib, sys
    import dynkv
    pool = dynkv.HostPool.attach(sys.argv[1], pin=False)
    assert not pool.pinned
    print(pool.nbytes, hashlib.sha256(ctypes.string_at(pool.ptr, pool.nbytes)).hexdigest())
    ctypes.memset(pool.ptr, 0x5A, 100)
    pool.close()
    """
)


def shm_path(name: str) -> str:
    return f"/dev/shm/{name}"


@pytest.fixture
def shm_name():
    name = f"dynkv-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield name
    dynkv.HostPool.unlink(name)  # a failed test may leave it behind


def test_create_attach_from_another_process(rng, shm_name):
    pool = dynkv.HostPool.create(10_000, name=shm_name, pin=False)
    assert (pool.nbytes, pool.name, pool.pinned) == (12_288, shm_name, False)  # rounded up to 4 KiB
    assert os.path.exists(shm_path(shm_name))
    assert os.path.getsize(shm_path(shm_name)) == pool.nbytes
    t = pool.as_tensor()
    assert t.dtype == torch.uint8 and t.numel() == pool.nbytes and t.data_ptr() == pool.ptr
    assert bool((t == 0).all())  # tmpfs hands out zeroed pages
    data = random_bytes(rng, pool.nbytes)
    t.copy_(data)

    import hashlib

    out = subprocess.run(
        [sys.executable, "-c", CHILD, shm_name], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    size, digest = out.stdout.split()
    assert int(size) == pool.nbytes
    assert digest == hashlib.sha256(data.numpy().tobytes()).hexdigest()
    # the child's writes land in the same memory; the attacher's close leaves the name in place
    assert bool((t[:100] == 0x5A).all())
    assert torch.equal(t[100:], data[100:])
    assert os.path.exists(shm_path(shm_name))

    pool.close()
    assert not os.path.exists(shm_path(shm_name)), "owner close must unlink /dev/shm/<name>"
    with pytest.raises(ValueError, match=r"host pool is closed"):
        pool.as_tensor()
    pool.close()  # idempotent


def test_context_manager_unlinks(shm_name):
    with dynkv.HostPool.create(4096, name=shm_name, pin=False) as pool:
        assert os.path.exists(shm_path(shm_name))
        assert pool.ptr != 0
    assert not os.path.exists(shm_path(shm_name))


def test_attach_in_process_shares_memory(shm_name):
    with dynkv.HostPool.create(8192, name=shm_name, pin=False) as owner:
        with dynkv.HostPool.attach(shm_name, pin=False) as other:
            assert other.nbytes == owner.nbytes and other.ptr != owner.ptr
            owner.as_tensor()[:16] = torch.arange(16, dtype=torch.uint8)
            assert torch.equal(other.as_tensor()[:16], torch.arange(16, dtype=torch.uint8))
        assert os.path.exists(shm_path(shm_name)), "closing an attached pool must not unlink"


def memfd_target(path: str) -> str | None:
    """What ``/proc/<pid>/fd/<n>`` leads to (``/memfd:<label> (deleted)`` for a memfd), None if nothing."""
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return None


def test_memfd_create_attach_from_another_process(rng, shm_name, tmp_path):
    """A memfd pool: nothing in /dev/shm; another process attaches by its path, or a link to it."""
    pool = dynkv.HostPool.create(10_000, name=shm_name, memfd=True, pin=False)
    assert (pool.nbytes, pool.name, pool.pinned, pool.memfd) == (12_288, shm_name, False, True)
    path = pool.path
    assert path.startswith(f"/proc/{os.getpid()}/fd/"), path
    assert memfd_target(path) == f"/memfd:{shm_name} (deleted)"
    assert not os.path.exists(shm_path(shm_name)), "a memfd pool has no name in /dev/shm"
    t = pool.as_tensor()
    assert bool((t == 0).all())  # the kernel hands out zeroed pages
    data = random_bytes(rng, pool.nbytes)
    t.copy_(data)

    import hashlib

    link = tmp_path / shm_name  # how the workers find it: a symlink in the run directory
    link.symlink_to(path)
    for where in (path, str(link)):
        t[:100] = data[:100]
        out = subprocess.run(
            [sys.executable, "-c", CHILD, where], capture_output=True, text=True, timeout=120, check=False
        )
        assert out.returncode == 0, out.stderr
        size, digest = out.stdout.split()
        assert int(size) == pool.nbytes
        assert digest == hashlib.sha256(data.numpy().tobytes()).hexdigest(), f"attached by {where}"
        # the child's writes land in the same memory
        assert bool((t[:100] == 0x5A).all()), f"attached by {where}"
        assert torch.equal(t[100:], data[100:])

    pool.close()
    assert pool.path == "" and pool.ptr == 0
    assert memfd_target(path) != f"/memfd:{shm_name} (deleted)", "owner close must close the memfd"
    with pytest.raises(ValueError, match=rf"cannot attach host pool '{link}': No such file"):
        dynkv.HostPool.attach(str(link), pin=False)
    pool.close()  # idempotent


def test_memfd_lives_as_long_as_a_mapping(shm_name):
    """Closing the creator frees nothing another process still maps; attachers' closes free nothing."""
    owner = dynkv.HostPool.create(8192, name=shm_name, memfd=True, pin=False)
    other = dynkv.HostPool.attach(owner.path, pin=False)
    assert (other.nbytes, other.name, other.path, other.memfd) == (owner.nbytes, owner.path, owner.path, False)
    assert other.ptr != owner.ptr
    owner.as_tensor()[:16] = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(other.as_tensor()[:16], torch.arange(16, dtype=torch.uint8))
    third = dynkv.HostPool.attach(owner.path, pin=False)
    third.close()
    assert owner.as_tensor()[15] == 15, "an attacher's close leaves the pool"
    path = owner.path
    owner.close()
    other.as_tensor()[16:32] = 9  # still mapped here: the memory is still there
    assert torch.equal(other.as_tensor()[:16], torch.arange(16, dtype=torch.uint8))
    if memfd_target(path) is None:  # else the fd number already holds another file of this process
        with pytest.raises(ValueError, match=r"cannot attach host pool '/proc/\d+/fd/\d+': No such file"):
            dynkv.HostPool.attach(path, pin=False)
    other.close()


def test_memfd_bad_paths_and_sizes(shm_name, tmp_path):
    with pytest.raises(ValueError, match=r"'/dev/null' is not a host pool: expected a memfd or a shared-memory file"):
        dynkv.HostPool.attach("/dev/null", pin=False)
    with pytest.raises(ValueError, match=rf"cannot attach host pool '{tmp_path}': Is a directory"):
        dynkv.HostPool.attach(str(tmp_path), pin=False)
    with pytest.raises(ValueError, match=r"cannot attach host pool '/no/such/pool': No such file or directory; "
                                         r"the engine's leader creates it"):
        dynkv.HostPool.attach("/no/such/pool", pin=False)
    with pytest.raises(ValueError, match=r"host pool path of 5001 characters is not valid"):
        dynkv.HostPool.attach("/" + "a" * 5000, pin=False)
    with pytest.raises(ValueError, match=r"a memfd host pool needs a name"):
        dynkv.HostPool.create(4096, memfd=True, pin=False)
    with pytest.raises(ValueError, match=r"host pool name 'a/b' is not valid"):
        dynkv.HostPool.create(4096, name="a/b", memfd=True, pin=False)
    with pytest.raises(ValueError, match=r"host pool size must be positive"):
        dynkv.HostPool.create(0, name=shm_name, memfd=True, pin=False)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def test_memfd_bigger_than_memory_raises(shm_name):
    """A memfd is not bound by /dev/shm's size but by the machine's memory: refused before a byte is taken."""
    too_big = 2 * mem_available() + (1 << 30)
    with pytest.raises(ValueError, match=r"the host pool needs \d+ bytes but this machine has \d+ bytes available "
                                         r"\(MemAvailable in /proc/meminfo\); lower the host tier size"):
        dynkv.HostPool.create(too_big, name=shm_name, memfd=True, pin=False)
    assert not os.path.exists(shm_path(shm_name))


# memfd_create fails as on a kernel without it; the pool falls back to /dev/shm.
NO_MEMFD = r"""
#include <errno.h>
int memfd_create(const char* name, unsigned int flags) { (void)name; (void)flags; errno = ENOSYS; return -1; }
"""
FALLBACK_CHILD = textwrap.dedent(
    """
    import os, sys
    import dynkv
    pool = dynkv.HostPool.create(4096, name=sys.argv[1], memfd=True, pin=False)
    print(pool.memfd, pool.path, os.path.exists(pool.path))
    pool.close()
    print(os.path.exists(pool.path))
    """
)


def test_memfd_unavailable_falls_back_to_dev_shm(shm_name, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the memfd_create stand-in")
    (tmp_path / "no_memfd.c").write_text(NO_MEMFD)
    shim = tmp_path / "no_memfd.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "no_memfd.c")], check=True)
    out = subprocess.run([sys.executable, "-c", FALLBACK_CHILD, shm_name], capture_output=True, text=True,
                         timeout=120, check=False, env={**os.environ, "LD_PRELOAD": str(shim)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", shm_path(shm_name), "True", "False"]


def test_create_existing_name_raises(shm_name):
    with dynkv.HostPool.create(4096, name=shm_name, pin=False) as pool:
        pool.as_tensor().fill_(7)
        with pytest.raises(ValueError, match=rf"host pool '{shm_name}' already exists in /dev/shm.*HostPool.unlink"):
            dynkv.HostPool.create(4096, name=shm_name, pin=False)
        # the failed create neither unlinked nor cleared the existing pool
        assert os.path.exists(shm_path(shm_name))
        assert bool((pool.as_tensor() == 7).all())


def test_bigger_than_dev_shm_raises(shm_name):
    vfs = os.statvfs("/dev/shm")
    free = vfs.f_bavail * vfs.f_frsize
    with pytest.raises(ValueError, match=r"/dev/shm has \d+ bytes free but the host pool needs \d+; enlarge /dev/shm"):
        dynkv.HostPool.create(free + (1 << 30), name=shm_name, pin=False)
    assert not os.path.exists(shm_path(shm_name))


def test_attach_missing_name_raises(shm_name):
    with pytest.raises(ValueError, match=rf"cannot attach host pool '{shm_name}'"):
        dynkv.HostPool.attach(shm_name, pin=False)


def test_bad_arguments(shm_name):
    with pytest.raises(ValueError, match=r"host pool name 'a/b' is not valid"):
        dynkv.HostPool.create(4096, name="a/b", pin=False)
    with pytest.raises(ValueError, match=r"host pool name 'a/b' is not valid"):
        dynkv.HostPool.attach("a/b", pin=False)
    with pytest.raises(ValueError, match=r"host pool size must be positive"):
        dynkv.HostPool.create(0, name=shm_name, pin=False)
    with pytest.raises(ValueError, match=r"chunk_bytes=1000 is not valid: expected a positive multiple of 4096"):
        dynkv.HostPool.create(4096, name=shm_name, pin=False, chunk_bytes=1000)
    assert not os.path.exists(shm_path(shm_name))


def test_unlink_stale_name(shm_name):
    pool = dynkv.HostPool.create(4096, name=shm_name, pin=False)
    assert dynkv.HostPool.unlink(shm_name)  # as if its creator had died
    assert not os.path.exists(shm_path(shm_name))
    assert not dynkv.HostPool.unlink(shm_name)
    pool.close()


def test_anonymous_pool(rng):
    pool = dynkv.HostPool.create(5000, pin=False)
    assert (pool.nbytes, pool.name, pool.pinned, pool.path, pool.memfd) == (8192, "", False, "", False)
    t = pool.as_tensor()
    data = random_bytes(rng, pool.nbytes)
    t.copy_(data)
    assert torch.equal(pool.as_tensor(), data)
    pool.close()
    assert pool.ptr == 0


@pytest.mark.parametrize("kind", ["named", "memfd", "anonymous"])
def test_page_buffer_from_pool_round_trip(rng, shm_name, kind):
    shape = SHAPES[0]
    kv = make_rank_kv(rng, shape, dims="BLNHC", form="layers", dtype=torch.bfloat16, heads=(2, 4))
    view = kv.view(num_heads_total=4, head_start=2)
    g = view.geometry
    offset, stride, n = 4096, g.page_bytes + 256, 5
    with dynkv.HostPool.create(offset + n * stride + 100, name=None if kind == "anonymous" else shm_name,
                               memfd=kind == "memfd", pin=False) as pool:
        buf = dynkv.PageBuffer.from_pool(g, pool, offset=offset, page_stride=stride)
        assert (buf.num_pages, buf.page_stride, buf.pinned) == ((pool.nbytes - offset) // stride, stride, False)
        all_bytes = pool.as_tensor()
        all_bytes.fill_(SENTINEL)
        pages = Pages(g, all_bytes[offset:], buf.num_pages, stride, buf)
        ids = block_choice(rng, 6, 4, unique=False)
        slots = block_choice(rng, buf.num_pages, 4, unique=True)
        want = expected_gather(kv, pages, 2, ids, slots)
        dynkv.gather(view, buf, ids, slots)
        assert_bytes_equal(pages.flat, want, "gather into the pool")
        assert bool((all_bytes[:offset] == SENTINEL).all())

        back = make_rank_kv(rng, shape, dims="LHBNC", form="cross", dtype=torch.bfloat16, heads=(2, 4))
        back.poison()
        dst = block_choice(rng, 6, 4, unique=True)
        want2 = expected_scatter(pages, back, 2, slots, dst)
        dynkv.scatter(buf, back.view(num_heads_total=4, head_start=2), slots, dst)
        assert_bytes_equal(back.storages, want2, "scatter from the pool")
        l1, l2 = kv.layers(), back.layers()
        for b, d in zip(ids, dst):
            for l in range(3):
                assert torch.equal(back.block(l2, l, d), kv.block(l1, l, b))
