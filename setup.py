"""Build and install tsprune (pure Python packages + the C++/OpenMP CPU extension).

Install into an environment that already has torch (torch is deliberately NOT a dependency, so
pip never replaces the user's build of it):

    pip install --no-build-isolation -e .

Environment switches:
    TSPRUNE_SKIP_CPP_BUILD=1     pure-Python install: build no extension (torch not needed to build)
    TSPRUNE_NO_NATIVE=1          compile the CPU extension without -march=native (portable binary)
    TSPRUNE_SKIP_CUDA_BUILD=1    never build the CUDA extension
    TSPRUNE_FORCE_CUDA_BUILD=1   build the CUDA extension even if no GPU is visible (needs nvcc)
    TSPRUNE_CUDA_ARCHS="8.0;9.0" CUDA architectures for the CUDA extension (TORCH_CUDA_ARCH_LIST)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _packages():
    pkgs = ["tsprune_kernels"] + find_packages(
        where=ROOT, include=["tsprune_kernels.*"], exclude=["tests", "tests.*"]
    )
    pkgs += ["tsprune"] + find_packages(where=os.path.join(ROOT, "python"),
                                        include=["tsprune.*"])
    # Keep only packages whose directory exists (the tree may be partly written).
    out = []
    for p in dict.fromkeys(pkgs):
        parts = p.split(".")
        base = ["python"] if parts[0] == "tsprune" else []
        if os.path.isdir(os.path.join(ROOT, *base, *parts)):
            out.append(p)
    return out


def _import_torch():
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        sys.exit(
            "tsprune: building the C++ extension needs PyTorch, which is not importable here "
            f"({e}).\n"
            "  Install torch first (your own build; tsprune never installs or replaces it), then "
            "run\n      pip install --no-build-isolation -e .\n"
            "  (--no-build-isolation lets the build see the installed torch), or set "
            "TSPRUNE_SKIP_CPP_BUILD=1 for a pure-Python install."
        )
    return torch


def _extensions():
    """Returns (ext_modules, cmdclass)."""
    if _env_flag("TSPRUNE_SKIP_CPP_BUILD"):
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cxx_flags = ["-O3", "-fopenmp"]
    if not _env_flag("TSPRUNE_NO_NATIVE"):
        cxx_flags.append("-march=native")
    cpu_sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    exts = [
        CppExtension(
            name="tsprune_kernels._C",
            sources=cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp", "-lgomp"],
        )
    ]

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    want_cuda = (
        bool(cuda_sources)
        and not _env_flag("TSPRUNE_SKIP_CUDA_BUILD")
        and (torch.cuda.is_available() or _env_flag("TSPRUNE_FORCE_CUDA_BUILD"))
    )
    if want_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            if _env_flag("TSPRUNE_FORCE_CUDA_BUILD"):
                sys.exit(
                    "tsprune: TSPRUNE_FORCE_CUDA_BUILD=1 but no CUDA toolkit was found (set "
                    "CUDA_HOME to a toolkit with nvcc), or unset it to skip the CUDA extension."
                )
            print(
                "tsprune: a GPU is visible but no CUDA toolkit (nvcc / CUDA_HOME) was found; "
                "skipping the CUDA extension tsprune_kernels._C_cuda.",
                file=sys.stderr,
            )
            want_cuda = False
    if want_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TSPRUNE_CUDA_ARCHS", "8.0;9.0")
        from torch.utils.cpp_extension import CUDAExtension

        cuda_cpp = sorted(glob.glob("csrc/cuda/*.cpp", root_dir=ROOT))
        exts.append(
            CUDAExtension(
                name="tsprune_kernels._C_cuda",
                sources=cuda_cpp + cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={
                    "cxx": ["-O3"],
                    "nvcc": ["-O3", "-lineinfo"],
                },
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


_on_linux_x86 = "platform_system == 'Linux' and platform_machine == 'x86_64'"

ext_modules, cmdclass = _extensions()

setup(
    name="tsprune",
    version="0.1.0",
    description="Structured pruning (prune-then-finetune) for time-series foundation models",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"tsprune": "python/tsprune"},
    package_data={"tsprune": ["default/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["tsprune = tsprune.cli:main"]},
    # torch is intentionally absent: users bring their own build, pip must never replace it.
    install_requires=[
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        f"triton; {_on_linux_x86}",
        "chronos-forecasting",
        "transformers>=5",
        "peft>=0.21",  # LoRA fine-tuning (--lora-rank); imported only then. 0.21.2 tested with transformers 5
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
    zip_safe=False,
)
