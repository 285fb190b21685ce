# GPU image: NVIDIA's PyTorch container (CUDA, torch, Transformer Engine, apex as the image ships them) plus
# megatron-core and caopd_megatron. The base tag is pinned: 25.12 = Python 3.12, torch 2.10.0a0, CUDA 13.1.
#   docker build -t caopd-megatron .
#   docker run --gpus all --ipc=host --rm caopd-megatron                 # smoke: the GPU tests, FP8 included
#   docker run --gpus all --ipc=host --rm caopd-megatron caopd demo      # the embedded default on the GPU
FROM nvcr.io/nvidia/pytorch:25.12-py3
WORKDIR /opt/caopd_megatron
# The image's torch, Transformer Engine and apex must survive every pip call below: the image's own constraint
# file (/etc/pip/constraint.txt, PIP_CONSTRAINT) pins them, and keep.txt pins them again from what is installed.
# megatron-core is the line the test suite runs against (0.16.1; it has a CPython 3.12 wheel) and is installed
# without dependencies (it would otherwise ask pip for a torch); the project itself with --no-deps.
RUN pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine[a-z0-9_-]*|apex|triton|pytorch[-_]triton)==' \
        > /opt/keep.txt \
    && pip install --no-cache-dir --no-deps "megatron-core==0.16.1" \
    && pip install --no-cache-dir -c /opt/keep.txt "hydra-core>=1.3" "omegaconf>=2.3" "transformers>=4.45" \
        "tokenizers>=0.19" "safetensors>=0.4" "matplotlib>=3.7" "tqdm>=4.60" "pyyaml>=6" "psutil>=5.9" \
        "packaging" "numpy" "pytest>=7"
COPY setup.py README.md ./
COPY caopd_megatron ./caopd_megatron
COPY tools ./tools
COPY examples ./examples
COPY tests ./tests
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir --no-deps -e . \
    && pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine[a-z0-9_-]*|apex|triton|pytorch[-_]triton)==' \
        | diff - /opt/keep.txt
# Smoke: the tests marked gpu (losses bf16 vs fp64, sampler and one step vs CPU, shims off, FP8 through TE) and
# the FP8 configuration mapping.
CMD ["python", "-m", "pytest", "-q", "tests/test_gpu.py", "tests/test_fp8_config.py"]
