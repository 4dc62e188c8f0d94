# Sourced by examples/gpu_*.sh: what a lent GPU machine needs before ebmm runs there.
# The wheels under .whl/ (the Python dependencies that machine lacks, e.g. piqa) go into
# /tmp/site; the repository and /tmp/site on the path; the data root is .gpu-data/.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 EBMM_DATA="$PWD/.gpu-data"
