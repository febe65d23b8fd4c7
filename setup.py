"""Native build of flashmoe-plugin (metadata lives in pyproject.toml).

Conventions (add a compiled module by adding files, never by editing this one):
- every cython/<stem>.pyx becomes the extension module flashmoe_plugin.<stem>;
- a .pyx names its C/CUDA sources and include dirs in its header, relative to this folder:
      # distutils: sources = csrc/cpu/fm_io.c csrc/cpu/crc32c.c
      # distutils: include_dirs = csrc/cpu
- a .pyx whose stem ends in `_cuda` is built only where nvcc is found; its .cu sources are compiled
  with nvcc and the module links the toolkit's cudart (never libtorch).

C flags: -O3 -fPIC -pthread -fvisibility=hidden, never -march: SIMD code uses function-level
__attribute__((target("avx2"))) etc. with run-time __builtin_cpu_supports dispatch, so one build
runs on every x86-64.

Environment:
  FLASHMOE_CFLAGS      extra compile and link flags, e.g. "-fsanitize=address -g" (forces a rebuild)
  FLASHMOE_CUDA        unset: build CUDA modules if nvcc is found (a failing nvcc build then only
                       skips them, with a warning); 1: required (missing nvcc or a failure is an
                       error); 0: never
  CUDA_HOME, CUDA_PATH where the toolkit is (otherwise nvcc on PATH, then /usr/local/cuda)
  FLASHMOE_CUDA_ARCH   nvcc target flags, default
                       "-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
                        -gencode arch=compute_90,code=compute_90"
  FLASHMOE_NVCC_FLAGS  extra nvcc flags
  FLASHMOE_NVCC_CACHE  0 disables the cache of nvcc objects in build/nvcc-cache/
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent
if Path.cwd().resolve() != HERE:  # the paths below (and in the .pyx headers) are relative to here
    os.chdir(HERE)

PACKAGE = "flashmoe_plugin"
CFLAGS = ["-O3", "-fPIC", "-pthread", "-fvisibility=hidden"]
LDFLAGS = ["-pthread"]
NVCC_FLAGS = ["-O3", "-Xcompiler", "-fPIC", "-std=c++17"]
DEFAULT_CUDA_ARCH = ("-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 "
                     "-gencode arch=compute_90,code=compute_90")
NATIVE_SUFFIXES = {".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh", ".inc"}


def say(msg: str) -> None:
    print(f"flashmoe-plugin: {msg}", file=sys.stderr, flush=True)


def is_cuda_module(ext: Extension) -> bool:
    return ext.name.rsplit(".", 1)[-1].endswith("_cuda")


def extensions() -> list[Extension]:
    # Every native file is a dependency of every module: a header change rebuilds what needs it
    # (a few seconds at most), and setuptools puts `depends` into the sdist.
    native = sorted(p.as_posix() for p in Path("csrc").rglob("*") if p.suffix in NATIVE_SUFFIXES)
    pxd = sorted(p.as_posix() for p in Path("cython").glob("*.pxd"))
    return [Extension(f"{PACKAGE}.{pyx.stem}", [pyx.as_posix()], depends=native + pxd)
            for pyx in sorted(Path("cython").glob("*.pyx"))]


# ---------------------------------------------------------------------------------------- CUDA

class CudaToolkit:
    def __init__(self, nvcc: str, include_dirs: list[str], library_dirs: list[str], version: str):
        self.nvcc, self.include_dirs, self.library_dirs, self.version = nvcc, include_dirs, library_dirs, version


def _nvcc_candidates():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            yield Path(root, "bin", "nvcc"), f"{var}={root}"
    found = shutil.which("nvcc")
    if found:
        yield Path(found), "PATH"
    yield Path("/usr/local/cuda/bin/nvcc"), "/usr/local/cuda"


def find_cuda() -> tuple[CudaToolkit | None, str]:
    """The toolkit to build with, or None and why not."""
    tried = []
    for nvcc, where in _nvcc_candidates():
        if not (nvcc.is_file() and os.access(nvcc, os.X_OK)):
            tried.append(f"{where}: no {nvcc}")
            continue
        try:
            # nvcc reports its own layout (works through wrapper scripts and pip-installed
            # toolkits): -I and -L directories of the toolkit. The input file need not exist.
            dry = subprocess.run([str(nvcc), "--dryrun", "-c", "flashmoe_probe.cu", "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            ver = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"{where}: {nvcc} does not run ({e})")
            continue
        if ver.returncode != 0:
            tried.append(f"{where}: {nvcc} does not run (exit {ver.returncode})")
            continue
        text = dry.stdout + dry.stderr
        incs, libs, top = [], [], None
        for line in text.splitlines():
            line = line.removeprefix("#$ ").strip()
            if line.startswith("TOP="):
                top = line[4:].strip().strip('"')
            elif line.startswith("INCLUDES="):
                incs += [a[2:] for a in shlex.split(line[9:]) if a.startswith("-I")]
            elif line.startswith("LIBRARIES="):
                libs += [a[2:] for a in shlex.split(line[10:]) if a.startswith("-L") and not a.rstrip("/").endswith("stubs")]
        roots = [Path(top)] if top else []
        roots.append(nvcc.resolve().parent.parent)
        for root in roots:
            incs.append(str(root / "include"))
            libs += [str(root / "lib64"), str(root / "lib")]
        incs = _unique_existing(incs, "cuda_runtime.h")
        libs = _unique_existing(libs, "libcudart.so")
        if not incs or not libs:
            tried.append(f"{where}: {nvcc} found but not cuda_runtime.h / libcudart.so next to it")
            continue
        m = re.search(r"release ([0-9.]+)", ver.stdout)
        return CudaToolkit(str(nvcc), incs[:1], libs[:1], m.group(1) if m else "?"), ""
    return None, "nvcc not found (" + "; ".join(tried) + ")"


def _unique_existing(dirs: list[str], marker: str) -> list[str]:
    out = []
    for d in dirs:
        p = Path(d).resolve()
        if (p / marker).exists() and str(p) not in out:
            out.append(str(p))
    return out


# ----------------------------------------------------------------------------------- build_ext

class build_ext(_build_ext):
    """Cythonizes cython/*.pyx (reading their `# distutils:` headers), drops CUDA modules where
    there is no nvcc, compiles .cu sources with nvcc, and applies the project's flags."""

    def initialize_options(self):
        super().initialize_options()
        self.cuda = None
        self.nvcc_force = False

    def run(self):
        from Cython.Build import cythonize

        cuda_exts = [e for e in self.extensions if is_cuda_module(e)]
        if cuda_exts:
            self.extensions = [e for e in self.extensions if not is_cuda_module(e)]
            names = ", ".join(e.name for e in cuda_exts)
            mode = os.environ.get("FLASHMOE_CUDA", "").strip()
            if mode == "0":
                say(f"skipped CUDA module {names}: FLASHMOE_CUDA=0")
            else:
                self.cuda, why = find_cuda()
                if self.cuda is None and mode == "1":
                    raise CompileError(f"FLASHMOE_CUDA=1 but {why}")
                if self.cuda is None:
                    say(f"skipped CUDA module {names}: {why}")
                else:
                    say(f"building CUDA module {names} with {self.cuda.nvcc} (CUDA {self.cuda.version}, "
                        f"{os.environ.get('FLASHMOE_CUDA_ARCH') or DEFAULT_CUDA_ARCH})")
                    for e in cuda_exts:
                        e.optional = mode != "1"  # auto mode: a failing CUDA build warns, CPU still installs
                    self.extensions += cuda_exts

        self.nvcc_force = bool(self.force)
        if os.environ.get("FLASHMOE_CFLAGS", "").strip():
            self.force = True  # C objects built with other flags must not be reused (nvcc: unaffected)
        for ext in self.extensions:
            # cythonize returns new Extension objects carrying what the .pyx header declares;
            # copy that onto ours, which setuptools has already prepared (private attributes).
            new = cythonize([ext], force=self.force, quiet=not self.verbose, include_path=["cython"],
                            compiler_directives={"language_level": 3, "embedsignature": True})[0]
            for key, value in vars(new).items():
                if not key.startswith("_") and key not in ("name", "optional", "py_limited_api"):
                    setattr(ext, key, value)
        super().run()

    def build_extension(self, ext):
        extra = shlex.split(os.environ.get("FLASHMOE_CFLAGS", ""))
        if self.compiler.compiler_type == "unix":
            ext.extra_compile_args = CFLAGS + list(ext.extra_compile_args or []) + extra
            ext.extra_link_args = LDFLAGS + list(ext.extra_link_args or []) + extra
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            if self.cuda is None:
                raise CompileError(f"{ext.name}: .cu sources but no CUDA toolkit")
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects or []) + self.nvcc_compile(ext, cu)
            ext.include_dirs = list(ext.include_dirs) + self.cuda.include_dirs
            ext.library_dirs = list(ext.library_dirs) + self.cuda.library_dirs
            ext.runtime_library_dirs = list(ext.runtime_library_dirs) + self.cuda.library_dirs
            ext.libraries = list(ext.libraries) + ["cudart", "stdc++"]
        super().build_extension(ext)

    def nvcc_compile(self, ext, sources: list[str]) -> list[str]:
        arch = shlex.split(os.environ.get("FLASHMOE_CUDA_ARCH") or DEFAULT_CUDA_ARCH)
        flags = NVCC_FLAGS + arch + shlex.split(os.environ.get("FLASHMOE_NVCC_FLAGS", ""))
        if _version_tuple(self.cuda.version) >= (11, 3) and not any(f.startswith(("-t", "--threads")) for f in flags):
            flags += ["--threads", "0"]  # the -gencode targets compile in parallel
        incs = [f"-I{d}" for d in list(ext.include_dirs) + self.cuda.include_dirs]
        objects = []
        for src in sources:
            obj = Path(self.build_temp, "nvcc", Path(src).with_suffix(".o"))
            objects.append(str(obj))
            obj.parent.mkdir(parents=True, exist_ok=True)
            cmd = [self.cuda.nvcc, "-c", src, "-o", str(obj), *flags, *incs]
            cached = self.nvcc_cache_path(src, ext, cmd)
            if cached is not None and cached.exists() and not self.nvcc_force:
                say(f"nvcc: {src} unchanged, reusing {cached}")
                shutil.copyfile(cached, obj)
                continue
            say(" ".join(shlex.quote(c) for c in cmd))
            try:
                subprocess.run(cmd, check=True)
            except (OSError, subprocess.CalledProcessError) as e:
                raise CompileError(f"nvcc failed on {src}: {e}") from e
            if cached is not None:
                self.nvcc_cache_store(obj, cached)
        return objects

    # nvcc takes minutes for a kernel file and editable installs build in a fresh temporary folder
    # each time, so objects are kept in build/nvcc-cache/, keyed by the source, the headers next to
    # it and in its include dirs, the command line and the nvcc version. FLASHMOE_NVCC_CACHE=0: off.
    def nvcc_cache_path(self, src: str, ext, cmd: list[str]) -> Path | None:
        if os.environ.get("FLASHMOE_NVCC_CACHE", "1").strip() == "0":
            return None
        import hashlib

        h = hashlib.sha256()
        h.update(repr([c for c in cmd if c != cmd[4]]).encode())  # all but the -o path
        h.update(self.cuda.version.encode())
        files = {Path(src)}
        for d in [Path(src).parent, *map(Path, ext.include_dirs)]:
            if d.is_dir() and not d.is_absolute():
                files.update(p for p in d.iterdir() if p.suffix in NATIVE_SUFFIXES - {".c", ".cc", ".cpp"})
        for f in sorted(files):
            h.update(f.as_posix().encode() + b"\0" + f.read_bytes())
        return HERE / "build" / "nvcc-cache" / f"{Path(src).stem}-{h.hexdigest()[:20]}.o"

    @staticmethod
    def nvcc_cache_store(obj: Path, cached: Path) -> None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            old = sorted(cached.parent.glob(cached.name.rsplit("-", 1)[0] + "-*.o"), key=os.path.getmtime)
            for stale in old[:-3]:  # keep the three most recent versions of each source
                stale.unlink()
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            shutil.copyfile(obj, tmp)
            os.replace(tmp, cached)
        except OSError as e:  # a read-only tree only loses the cache
            say(f"nvcc cache not written ({e})")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2]) or (0,)


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext})
