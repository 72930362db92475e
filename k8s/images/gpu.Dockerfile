# Production (GPU) image: the CUDA vllm build, for k8s/overlays/gpu and cluster/launcher/aws-gpu.yaml.
# Build from the repository root (BuildKit uses gpu.Dockerfile.dockerignore beside this file):
#   docker build -f k8s/images/gpu.Dockerfile -t ghcr.io/example/ragtune:0.1.0-gpu .
# It installs the project as the README does (`pip install -e ".[gpu]"`) into the Ray image's
# Python 3.11. Base models are Hugging Face ids, cached on the shared volume (HF_HOME) at run time.
FROM rayproject/ray:2.60.0-py311-cu128

# rayproject images run as the non-root user `ray` (uid 1000, group `users` gid 100).
USER ray
WORKDIR /home/ray/ragtune

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. Dependencies in their own layer (kept while only the source changes): the package stubs let
#    the editable install resolve; the real source replaces them in step 2.
COPY --chown=ray:users pyproject.toml README.md k8s/images/constraints.txt ./
RUN mkdir -p serve train retrieval cluster loadtests \
 && touch serve/__init__.py train/__init__.py retrieval/__init__.py cluster/__init__.py loadtests/__init__.py \
 && pip install -c constraints.txt -e ".[gpu]"

# 2. The source.
COPY --chown=ray:users . .
