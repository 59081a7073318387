FROM python:3.11-slim
WORKDIR /app
COPY . /app
# torch first, CPU build: an unpinned torch would pull CUDA packages.
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -e .
ENV OFFSITE_HOME=/data/offsite HF_HUB_OFFLINE=1
