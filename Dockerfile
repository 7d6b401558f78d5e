# One image for every service of docker-compose.yml: Ray head and GPU workers, the MLflow
# server and the prediction API. CUDA PyTorch comes with the pinned base image; the
# project's `torch` requirement is already satisfied by it.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ensemble_service ./ensemble_service
COPY workers ./workers
COPY conf ./conf
# the MLflow server's basic-auth configuration (no secrets: they come from the environment)
COPY docker ./docker
# psycopg2 and boto3: the MLflow server's Postgres backend store and S3 artifact store;
# mlflow[auth]: its basic-auth app
RUN pip install -e ".[server]"

# ensemble_service finds conf/ next to the package; jobs submitted with `ensemble submit
# --address` bring their own copy of the project as the job's working directory.
CMD ["ensemble", "--help"]
