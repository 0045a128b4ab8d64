# The pagerloop image: the worker and the API run from it (see docker-compose.yml).
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/pagerloop

RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /app
# The dependencies first (a layer kept while only our code changes): uv needs the workspace
# member's pyproject (sdk/, the pagerloop-sdk distribution) to read the workspace.
COPY pyproject.toml uv.lock README.md ./
COPY sdk/pyproject.toml sdk/
RUN uv sync --frozen --no-dev --no-install-workspace
# Then the server and the SDK it depends on (a workspace member, installed from sdk/).
COPY sdk/ sdk/
COPY . .
RUN uv sync --frozen --no-dev

ENV PATH=/opt/pagerloop/bin:$PATH
RUN useradd --system --uid 10001 pagerloop
USER pagerloop
CMD ["pagerloop", "worker"]
