# fednipype as a BIDS-App container:
#   docker build -t fednipype .
#   docker run --rm -u "$(id -u):$(id -g)" -v BIDS:/data:ro -v OUT:/out fednipype /data /out participant
# The README's "Containers" section has the mounts for the work folder, the site policy and its
# ledger, and the Apptainer/Singularity equivalents.
#
# The base is pinned by tag and by the digest of its multi-architecture index: a rebuild gets
# the same Python and Debian. To move to a newer base, change both, taking the digest from
# `docker buildx imagetools inspect python:<tag>`.

# -- 1. build fednipype's wheel from setup.py (only the files the package needs) -------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS wheel

WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY fednipype ./fednipype
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- 2. the runtime image: the wheel and its dependencies, no source, no pip cache -----------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="fednipype" \
      org.opencontainers.image.description="Privacy-preserving multi-site neuroimaging: Nipype nodes for BIDS data, differentially private releases, meta-analysis and pooled regression (a BIDS-App)." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}"

# Any user id may run the image (`-u $(id -u):$(id -g)`, or Apptainer's host user): the home
# folder is writable by all, like /tmp, and matplotlib keeps its cache under /tmp.
ENV HOME=/home/fednipype \
    MPLCONFIGDIR=/tmp/matplotlib \
    MPLBACKEND=Agg \
    NIPYPE_NO_ET=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/fednipype \
        --shell /usr/sbin/nologin fednipype \
    && chmod 1777 /home/fednipype

RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/fednipype-*.whl \
    && pip check

USER 1000:1000
WORKDIR /home/fednipype
ENTRYPOINT ["fednipype"]
CMD ["--help"]
