# msa_cuda in a CUDA 13.0 container: the README's two commands build and test the package.
#   docker build -t msa_cuda .
#   docker run --gpus all msa_cuda            # runs the tests (GPU tests need an SM90 GPU)
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    MAX_JOBS=8
RUN python3 -m venv /opt/venv

WORKDIR /opt/msa_cuda
COPY . .
# 1. set up
RUN pip install -r requirements.txt && pip install --no-build-isolation .
# 2. test
CMD ["python", "-m", "pytest", "tests", "-q", "-rs"]
