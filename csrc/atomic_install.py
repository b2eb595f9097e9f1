"""Install a built extension file without touching the one running processes have loaded.

Imported by ``setup.py`` (by path: this folder is not a package) and by the tests.

``pip install -e .`` / ``setup.py build_ext --inplace`` build ``_C*.so`` in a temporary
folder, then copy it into the source tree over the previous build. setuptools' copy removes
the old file and writes the new one in 16 KiB pieces, so for the length of the copy the path
is missing or holds a partial library: a process that imports the extension at that moment
(steppo_fast imports it lazily, at the first ``impl="cpp"`` / ``"auto"`` CPU op) fails to
import or maps a truncated file and dies with SIGBUS/SIGSEGV. And a copy that writes into the
existing file instead (``cp``, ``shutil.copyfile``) rewrites the pages every process that
loaded it executes.

:func:`install_file` writes the new build to a temporary file in the destination folder,
flushes it to disk and renames it over the destination (``os.replace``, atomic on POSIX):
a reader sees the complete old file or the complete new one, and processes that loaded the
old file keep running its inode, which the kernel keeps until they exit. They go on running
the old code until restarted.
"""

from __future__ import annotations

import os
import shutil
import tempfile


def install_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically (temporary file in ``dst``'s folder + rename).

    The mode bits of ``src`` are kept. On any failure ``dst`` is left as it was and the
    temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        shutil.copymode(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


EXTENSION_SUFFIXES = (".so", ".pyd", ".dylib")


def atomic_build_ext(base: type) -> type:
    """A subclass of the ``build_ext`` command ``base`` whose copies of built extension
    libraries into the source tree (editable installs, ``--inplace``) go through
    :func:`install_file`; every other copy is unchanged."""

    class AtomicBuildExt(base):
        def copy_file(self, infile, outfile, *args, **kwargs):
            if self.dry_run or not str(outfile).endswith(EXTENSION_SUFFIXES):
                return super().copy_file(infile, outfile, *args, **kwargs)
            if os.path.isdir(outfile):
                outfile = os.path.join(outfile, os.path.basename(infile))
            install_file(infile, outfile)
            return outfile, True

    AtomicBuildExt.__name__ = f"Atomic{base.__name__}"
    return AtomicBuildExt
