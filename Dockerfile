# capline on a CUDA PyTorch image. Build and run:
#   docker build -t capline .
#   docker run --gpus all --shm-size 16g -v /data/coco:/data -v $PWD/runs:/app/runs capline \
#       fit --config coco_show_tell --trainer.devices 8
# The base image's torch 2.5.1 and torchvision 0.20.1 (CUDA 12.4, for drivers >= 550) lie inside the window CI
# tests (constraints-lowest.txt to constraints.txt; tests/test_dockerfile.py checks it).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
LABEL org.opencontainers.image.title="capline" torch.version="2.5.1" torchvision.version="0.20.1"

# Java runs the official COCO caption metrics (PTB tokenizer, METEOR).
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless=17.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY capline ./capline
COPY tools ./tools
# Every other package at the version the test suite passed with (constraints.txt); torch, torchvision and their
# CUDA libraries come with the base image, so their pins are left out and pip keeps the image's.
# pycocoevalcap's PTB tokenizer writes temporary files into its own package folder: the user must own it.
RUN grep -vE '^(torch|torchvision|triton|nvidia-|cuda-)' constraints.txt > /tmp/constraints.txt \
    && pip install --no-cache-dir . -c /tmp/constraints.txt \
    && useradd --create-home --uid 1000 capline \
    && mkdir -p /app/runs /app/data \
    && chown -R capline:capline /app \
    && chown -R capline:capline "$(python -c 'import os, pycocoevalcap; print(os.path.dirname(pycocoevalcap.__file__))')"

USER 1000:1000
ENV WANDB_DIR=/app/runs
ENTRYPOINT ["capline"]
CMD ["--help"]
