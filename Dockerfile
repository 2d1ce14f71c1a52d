# One image for every LLooMA process; the command picks the process:
#   python -m services.<name>                      one control-plane service
#   llooma host --config /etc/llooma/host.yaml     a host worker
#   llooma migrate                                 apply database migrations
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY pyproject.toml README.md ./
COPY libs/ libs/
COPY services/ services/
COPY proto/ proto/

# What the services and host workers need, no extras (dev, embedded servers, bench plots: see
# pyproject.toml); build leftovers are removed from the source tree.
RUN pip install . \
    && rm -rf build libs/*.egg-info *.egg-info

RUN useradd --create-home --uid 10001 --user-group llooma
USER llooma

CMD ["llooma", "--help"]
