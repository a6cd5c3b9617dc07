# A CPU image whose default command runs the demo. (Finished by the fine-tuning/demo issue.)
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -e .
ENV HF_HOME=/data/hf
VOLUME /data
CMD ["mlm-pretrain", "demo", "--out", "/data/demo"]
