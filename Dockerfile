# megatron-less on an NGC PyTorch image: the image's torch, TransformerEngine and apex stay as
# they are; vLLM is compiled against that torch; megatron-core and this package come from PyPI.
#
#   docker build -t megatron-less .                     (about an hour: vLLM compiles)
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v "$PWD/runs:/workspace/megatron-less/runs" megatron-less \
#     bash examples/launch/torchrun.sh examples/configs/qwen2.5-math-1.5b.yaml ...
#
# Written for nvcr.io/nvidia/pytorch:26.07-py3 (Python 3.12, torch 2.13.0a0, CUDA 13.3) and
# vLLM 0.32.0, the release this code is tested with (on CPU); vLLM's PyPI wheels pin torch==2.13.0,
# which pip cannot satisfy with the image's 2.13.0a0 under its PIP_CONSTRAINT, so vLLM is built
# from source after use_existing_torch.py drops its torch pins (as NeMo-RL's NGC image does).
# Another image: --build-arg BASE_IMAGE=... with a vLLM release whose torch matches it.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.07-py3

FROM ${BASE_IMAGE} AS vllm-build
ARG VLLM_VERSION=0.32.0
# compile jobs (memory-bound: ~4 GB each) and GPU architectures (A100 8.0, H100/H200 9.0)
ARG MAX_JOBS=16
ARG TORCH_CUDA_ARCH_LIST="8.0 9.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt
RUN git clone --depth 1 --branch "v${VLLM_VERSION}" https://github.com/vllm-project/vllm.git
WORKDIR /opt/vllm
# build requirements minus torch (the image's is used: --no-build-isolation)
RUN python3 use_existing_torch.py \
    && pip install --no-cache-dir -r requirements/build.txt \
    && MAX_JOBS="${MAX_JOBS}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
       pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /opt/wheels .

FROM ${BASE_IMAGE}
ARG MCORE_VERSION=0.19.2
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1
WORKDIR /workspace/megatron-less
COPY --from=vllm-build /opt/wheels /opt/wheels
# the package first (its layer is rebuilt only when these change), then the rest
COPY setup.py pyproject.toml README.md constraints.txt ./
COPY megatron_less ./megatron_less
# PIP_CONSTRAINT (set by the image) pins torch and the NVIDIA stack: a dependency that wants
# another torch fails the build instead of replacing it; the check after the install proves it.
RUN torch_before="$(python3 -c 'import torch; print(torch.__version__)')" \
    && pip install --no-cache-dir /opt/wheels/vllm-*.whl "megatron-core==${MCORE_VERSION}" \
    && pip install --no-cache-dir -e ".[test]" \
    && torch_after="$(python3 -c 'import torch; print(torch.__version__)')" \
    && if [ "${torch_after}" != "${torch_before}" ]; then \
         echo "pip replaced the image's torch ${torch_before} with ${torch_after}" >&2; exit 1; fi \
    && python3 -c "import megatron.core, transformer_engine, vllm, megatron_less.cli" \
    && rm -rf /opt/wheels
COPY examples ./examples
COPY tools ./tools
COPY benchmarks ./benchmarks
COPY tests ./tests
COPY docs ./docs
CMD ["bash"]
