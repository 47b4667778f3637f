# One image for every process of the project: worker, beat, migrations, sandbox, metrics.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY billing ./billing
COPY tasks ./tasks
COPY schedules ./schedules
RUN pip install --no-cache-dir ".[redbeat]" && useradd --create-home billing
USER billing
ENTRYPOINT ["billing"]
CMD ["--help"]
