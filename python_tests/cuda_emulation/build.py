"""Compiles a torch-free CUDA check TU (csrc/cuda/check/*.cu) for the CPU under cuda_emu.h.

The TU and every header it includes with quotes are copied into a build directory with the CUDA
syntax that no macro can express rewritten (nothing else changes, and line numbers are kept, with
#line pointing back at the original file, so compiler errors name the real source line):

  kernel<<<grid, block, smem, stream>>>(args)
      -> kernel % ::emu::LaunchConfig(grid, block, smem, stream)(args)
  extern __shared__ __align__(16) T name[];
      -> T* const name = reinterpret_cast<T*>(::emu::dynamic_shared_memory());
  __shared__ T name[N];
      -> unchanged, plus a registration that has it poisoned before every CTA

Only the launch brackets are replaced, so the kernel expression (template arguments, pointers) and
the argument list are parsed by the compiler, not by a regex. Matching runs on a copy of the source
with comments and literals blanked out, so a `<<<` in a comment cannot pair with a real launch.

The result is a shared library cached by a hash of everything that goes into it, loaded with ctypes.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
CHECK_DIR = CSRC / "cuda" / "check"
SHIM_HEADER = "cuda_emu.h"
SHIM_RUNTIME = "cuda_emu.cpp"

# -ffp-contract=off: g++ must round every operation separately, which the kernels' _rn intrinsics
# promise (and -std=c++20 rather than gnu++20 for the same reason on targets where gnu contracts).
# The sanitizers turn what would fault on a GPU but pass on x86 into a crash (SIGILL, which pytest's
# faulthandler reports with the test's traceback): a vector load from an address its type's
# alignment forbids (uint4 is 16-byte aligned, like a 128-bit LDG), and an index past the end of a
# fixed-size array, shared-memory tiles included. Trapping needs no sanitizer runtime in the
# process. To see the offending source line instead, set CONVMIXER_EMU_UBSAN_RUNTIME=1 and rerun the
# test with -s: the library then links libubsan, which prints file:line and exits the process.
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=off",
         "-fsanitize=alignment,bounds", "-DCONVMIXER_CUDA_EMULATION"]
TRAP_FLAGS = ["-fsanitize-undefined-trap-on-error"]
RUNTIME_FLAGS = ["-fno-sanitize-recover=all"]


# ------------------------------------------------------------------------------------------------
# Source rewriting
# ------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)


def mask_code(text: str) -> str:
    """`text` with comments and string/char literals replaced by spaces (newlines kept), so that
    offsets into the result are offsets into `text`."""
    return _TOKEN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _launch_edits(code: str, path: Path) -> list[tuple[int, int, str]]:
    edits = []
    pos = 0
    while (start := code.find("<<<", pos)) >= 0:
        depth, j = 0, start + 3
        while True:
            if j >= len(code) or (code[j] == ";" and depth == 0):
                line = code.count("\n", 0, start) + 1
                raise RuntimeError(f"{path}:{line}: '<<<' without a matching '>>>'")
            c = code[j]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == ">" and depth == 0 and code.startswith(">>>", j):
                # A template argument may end the config (`Smem<T>>>>`): the launch's own
                # brackets are the last three of the run.
                while j + 3 < len(code) and code[j + 3] == ">":
                    j += 1
                break
            j += 1
        edits.append((start, start + 3, " % ::emu::LaunchConfig("))
        edits.append((j, j + 3, ")"))
        pos = j + 3
    return edits


_ALIGN = re.compile(r"\b(?:__align__|alignas)\s*\([^()]*\)")
_EXTERN_SHARED = re.compile(
    r"\bextern\s+__shared__\s+(?P<type>[^;{}=]*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;")
# Declarators with commas or initialisers are left alone: they still work through the
# `#define __shared__ static` of the shim, just without poisoning.
_STATIC_SHARED = re.compile(
    r"\b__shared__\s+(?:__align__\s*\([^()]*\)|[^;{}()=,\[\]])*?"
    r"\b(?P<name>[A-Za-z_]\w*)\s*(?:\[[^\];]*\]\s*)*;")


def _shared_edits(code: str) -> list[tuple[int, int, str]]:
    edits = []
    taken = []
    for m in _EXTERN_SHARED.finditer(code):
        type_ = " ".join(_ALIGN.sub(" ", m.group("type")).split())
        name = m.group("name")
        newlines = "\n" * code.count("\n", m.start(), m.end())
        edits.append((m.start(), m.end(), f"{type_}* const {name} = "
                      f"reinterpret_cast<{type_}*>(::emu::dynamic_shared_memory());{newlines}"))
        taken.append(m.span())
    for m in _STATIC_SHARED.finditer(code):
        if any(a <= m.start() < b for a, b in taken):
            continue
        name = m.group("name")
        edits.append((m.end(), m.end(),
                      f" [[maybe_unused]] static const bool {name}__emu_registered"
                      f" = ::emu::register_static_shared(&{name}, sizeof({name}));"))
    return edits


def rewrite(text: str, path: Path) -> str:
    """The emulation's version of one source file (same line numbers)."""
    code = mask_code(text)
    edits = sorted(_launch_edits(code, path) + _shared_edits(code), key=lambda e: e[0])
    for (a_start, a_end, _), (b_start, _, _) in zip(edits, edits[1:]):
        if b_start < a_end:
            raise RuntimeError(f"{path}: overlapping rewrites at offset {b_start}")
    for start, end, new in reversed(edits):
        text = text[:start] + new + text[end:]
    return f'#line 1 "{path}"\n{text}'


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)


def _source_name(path: Path) -> str:
    """Where a source goes in the build directory's src/: its place under csrc/ (so that relative
    includes keep working), or _external/ for a TU from elsewhere (the shim's self-test)."""
    try:
        return path.relative_to(CSRC).as_posix()
    except ValueError:
        return f"_external/{path.name}"


def collect_sources(tu: Path) -> dict[str, str]:
    """{place in src/ (see _source_name): rewritten text} for the TU and every quoted include it
    reaches. Quoted includes resolve like the CMake check target's: next to the including file,
    then relative to csrc/. Angle-bracket includes are left to the compiler (the shim's include/
    directory stands in for the CUDA headers)."""
    out: dict[str, str] = {}
    todo = [tu.resolve()]
    while todo:
        path = todo.pop()
        rel = _source_name(path)
        if rel in out:
            continue
        text = path.read_text()
        out[rel] = rewrite(text, path)
        code = mask_code(text)
        for m in _INCLUDE.finditer(text):
            if code[text.index("#", m.start())] != "#":
                continue  # inside a comment
            name = m.group(1)
            for base in (path.parent, CSRC):
                if (base / name).is_file():
                    todo.append((base / name).resolve())
                    break
    return out


# ------------------------------------------------------------------------------------------------
# Building and loading
# ------------------------------------------------------------------------------------------------

def compiler() -> str | None:
    """The C++ compiler (CONVMIXER_EMU_CXX, default g++), or None when it is not installed."""
    return shutil.which(os.environ.get("CONVMIXER_EMU_CXX", "g++"))


def _cache_root() -> Path:
    explicit = os.environ.get("CONVMIXER_EMU_CACHE")
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    for root in ([Path(explicit)] if explicit else
                 [base / "convmixer_kernels" / "cuda_emulation",
                  Path(tempfile.gettempdir()) / f"convmixer_kernels_cuda_emulation_{os.getuid()}"]):
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            pass
    raise RuntimeError("no writable cache directory for the CUDA emulation builds")


def _shim_files() -> dict[str, bytes]:
    files = {SHIM_HEADER: (HERE / SHIM_HEADER).read_bytes(),
             SHIM_RUNTIME: (HERE / SHIM_RUNTIME).read_bytes()}
    for header in sorted((HERE / "include").glob("*.h")):
        files[f"include/{header.name}"] = header.read_bytes()
    return files


def build(tu: Path, cxx: str) -> Path:
    """Path of the emulated shared library for `tu`, compiling it unless a cached build exists."""
    sources = collect_sources(tu)
    shim = _shim_files()
    tu_rel = _source_name(tu.resolve())
    ubsan_runtime = os.environ.get("CONVMIXER_EMU_UBSAN_RUNTIME", "0") not in ("", "0")
    cmd = [cxx, *FLAGS, *(RUNTIME_FLAGS if ubsan_runtime else TRAP_FLAGS),
           "-Ishim/include", "-Isrc", "-include", f"shim/{SHIM_HEADER}",
           "-x", "c++", f"src/{tu_rel}", f"shim/{SHIM_RUNTIME}", "-ldl", "-o", "lib.so"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(repr((version, cmd)).encode())
    for name, data in sorted(shim.items()):
        digest.update(name.encode() + b"\0" + data + b"\0")
    for name, text in sorted(sources.items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    root = _cache_root()
    final = root / f"{Path(tu_rel).stem}-{digest.hexdigest()[:20]}"
    if (final / "lib.so").is_file():
        return final / "lib.so"

    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    built = False
    try:
        for name, data in shim.items():
            (work / "shim" / name).parent.mkdir(parents=True, exist_ok=True)
            (work / "shim" / name).write_bytes(data)
        for name, text in sources.items():
            (work / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            (work / "src" / name).write_text(text)
        # Kept next to the library, to rebuild by hand (e.g. with -g for gdb).
        (work / "command.txt").write_text(" ".join(cmd) + "\n")
        env = dict(os.environ, LC_ALL="C")
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(
                f"emulation build of {tu} failed (exit {proc.returncode}); rewritten sources kept "
                f"in {work}\n$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        built = True
        try:
            work.rename(final)  # atomic: a concurrent build of the same hash may win, that's fine
        except OSError:
            if not (final / "lib.so").is_file():
                raise
    finally:
        if built and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final / "lib.so"


@functools.lru_cache(maxsize=None)
def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.convmixer_emu_launch_log.restype = ctypes.c_char_p
    lib.convmixer_emu_launch_log.argtypes = []
    lib.convmixer_emu_clear_launch_log.argtypes = []
    lib.convmixer_emu_set_reverse_cta_order.argtypes = [ctypes.c_int]
    return lib


def load_check_library(tu: str | os.PathLike) -> ctypes.CDLL:
    """The emulated library of a check TU: a file name in csrc/cuda/check/ or a path. Skips the
    calling test when there is no C++ compiler; a failed compilation raises with its output."""
    path = Path(tu)
    if not path.is_absolute() and not path.exists():
        path = CHECK_DIR / path
    if not path.is_file():
        raise FileNotFoundError(path)
    cxx = compiler()
    if cxx is None:
        import pytest
        pytest.skip("CUDA emulation needs a C++ compiler (g++, or CONVMIXER_EMU_CXX); none found")
    return _load(str(build(path, cxx)))
