# GPU image: NVIDIA's PyTorch container brings CUDA, Transformer Engine and apex; we add megatron-core and caopd.
#   docker build -t caopd-megatron .
#   docker run --gpus all --ipc=host caopd-megatron caopd demo
FROM nvcr.io/nvidia/pytorch:25.01-py3
WORKDIR /opt/caopd_megatron
COPY setup.py README.md ./
COPY caopd_megatron ./caopd_megatron
COPY tools ./tools
COPY examples ./examples
# torch, Transformer Engine and apex come from the base image; do not let pip replace torch.
RUN pip install --no-cache-dir "megatron-core>=0.16.1" && pip install --no-cache-dir --no-deps -e . \
    && pip install --no-cache-dir hydra-core omegaconf transformers tokenizers safetensors matplotlib tqdm pyyaml
CMD ["caopd", "--help"]
